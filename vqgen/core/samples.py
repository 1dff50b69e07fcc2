"""A sample set on disk, written batch by batch as it is drawn, in bounded memory.

Every process writes its own samples into one temporary folder: PNGs named by the sample's index among
the n, and their rows of `codes.safetensors` (one int16 tensor (n, h, w), its header written first).
Once all are done the main process adds `grid.png` (the first nrow*nrow samples) and `settings.json`
and renames the folder into place: an interrupted or failed run leaves no sample folder, and the
files do not depend on how many processes drew them. A request the disk cannot hold is refused first.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vqgen.core.config import write_json_atomic
from vqgen.core.errors import VQGenError
from vqgen.core.imageio import load_png, save_grid, to_pil
from vqgen.core.interrupt import signals_deferred
from vqgen.core.layout import SampleSetDir
from vqgen.core.tensorfile import TensorFileRows, create_tensor_file
from vqgen.core.writes import ordinary_mode, remove, writing

PNG_MARGIN = 1.25  # the PNG size is estimated from one image; samples vary


def _size(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if nbytes < 1000 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return ""


def disk_needed(folder: Path, n: int, grid: tuple[int, int], png_bytes: int, nrow: int) -> tuple[int, int]:
    """(bytes the sample set will take in `folder`, bytes per image), counting whole file-system blocks."""
    try:
        block = os.statvfs(folder).f_frsize or 4096
    except OSError:
        block = 4096
    per_image = -(-int(png_bytes * PNG_MARGIN) // block) * block
    codes = n * grid[0] * grid[1] * 2
    grid_png = min(n, nrow * nrow) * int(png_bytes * PNG_MARGIN)
    return n * per_image + codes + grid_png + 4 * block, per_image


def start_sample_set(out: Path, n: int, grid: tuple[int, int], png_bytes: int, nrow: int) -> Path:
    """Main process: refuse what will not fit, then make the temporary folder with its codes file."""
    there = next(p for p in (out.parent, *out.parent.parents) if p.exists())  # the file system it will be on
    needed, per_image = disk_needed(there, n, grid, png_bytes, nrow)
    free = shutil.disk_usage(there).free
    if needed > free:
        raise VQGenError(f"--n {n} needs about {_size(needed)} in {out.parent} ({_size(per_image)} per image) but "
                         f"only {_size(free)} is free: sample fewer or make room")
    with writing(out.parent):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
        tmp.chmod(ordinary_mode(folder=True))  # mkdtemp's 0700 would stay with the renamed folder
    folder = SampleSetDir(tmp)
    with writing(folder.codes, temporary=tmp):
        folder.images.mkdir()
        create_tensor_file(folder.codes, "codes", (n, *grid), torch.int16)
    return tmp


class SampleSetWriter:
    """One process's writes into the temporary folder; `close` before the main process finishes the set."""

    def __init__(self, tmp: Path, n: int):
        self.folder = SampleSetDir(Path(tmp))
        self.n = n
        with writing(self.folder.codes):
            self._codes = TensorFileRows(self.folder.codes)

    def write(self, indices: Tensor, codes: Tensor, images: Tensor) -> None:
        """One batch: consecutive sample indices (b,), their codes (b, h, w) and uint8 images (b, c, H, W)."""
        for i, image in zip(indices.tolist(), images):
            path = self.folder.image(i, self.n)
            with writing(path):
                to_pil(image).save(path, format="PNG")
        with writing(self.folder.codes):
            self._codes.write(int(indices[0]), codes)

    def close(self) -> None:
        with writing(self.folder.codes):
            self._codes.close()


def finish_sample_set(tmp: Path, out: Path, n: int, nrow: int, settings: dict[str, Any]) -> None:
    """Main process, once every process has closed its writer: grid and settings, then one rename."""
    folder = SampleSetDir(Path(tmp))
    first = torch.stack([load_png(folder.image(i, n)) for i in range(min(n, nrow * nrow))])
    save_grid(first, folder.grid, nrow=nrow)
    write_json_atomic(settings, folder.settings)
    with signals_deferred(), writing(out):  # the rmdir and the rename happen together or not at all
        if out.exists():
            if any(out.iterdir()):
                raise VQGenError(f"--out {out} exists and is not empty; choose another folder")
            out.rmdir()
        os.replace(tmp, out)


def discard_sample_set(tmp: Path | None) -> None:
    remove(tmp)
