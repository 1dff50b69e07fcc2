"""The run's metric history: one JSON object per line, appended across resumes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vqgen.core.runtime.errors import VQGenError


class JsonlLog:
    """Appends one JSON object per line; the run's metric history across resumes."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:  # a full disk, say: one line naming the log
            raise VQGenError(f"cannot write {self.path}: {err.strerror or err}") from None

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash mid-write
                continue
        return records
