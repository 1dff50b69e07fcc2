"""A sample set on disk, written batch by batch as it is drawn, in bounded memory.

`with sample_set(state, out, ...) as samples:` is the whole protocol. The main process refuses a request the
disk cannot hold, then makes one temporary folder; every process writes its own samples into it (PNGs named
by the sample's index among the n, and their rows of `codes.safetensors`, one int16 tensor (n, h, w) whose
header is written first). When the block ends, the main process adds `grid.png` (the first nrow*nrow
samples) and `settings.json` and renames the folder into place. An error, an interrupt or SIGTERM in the
block leaves no sample folder, and the files do not depend on how many processes drew them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

from vqgen.core.runtime.errors import VQGenError
from vqgen.core.runtime.processes import from_main, raise_together
from vqgen.core.runtime.signals import signals_deferred, terminate_interrupts
from vqgen.core.store.atomic import ordinary_mode, remove, writing
from vqgen.core.store.configs import write_json_atomic
from vqgen.core.store.imageio import load_png, save_grid, to_pil
from vqgen.core.store.layout import SampleSetDir
from vqgen.core.store.tensorfile import TensorFileRows, create_tensor_file

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
    """One process's writes into the temporary folder; `close` before the main process finishes the set.
    `settings` (JSON-ready) is what settings.json will hold."""

    def __init__(self, tmp: Path, n: int):
        self.folder = SampleSetDir(Path(tmp))
        self.n = n
        self.settings: dict[str, Any] = {}
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


@contextlib.contextmanager
def sample_set(state: Any, out: Path, n: int, grid: tuple[int, int], png_bytes: int,
               nrow: int) -> Iterator[SampleSetWriter]:
    """Write n samples into `out` on every process (`state`: an Accelerator or PartialState): yields this
    process's writer; `out` appears, whole, when the block ends, and never when it fails."""
    tmp, error = None, None
    if state.is_main_process:
        try:
            tmp = start_sample_set(out, n, grid, png_bytes, nrow)
        except VQGenError as err:
            error = str(err)
    raise_together(state, error, main_only=True)
    tmp = from_main(state, tmp)
    writer = None
    try:
        with terminate_interrupts():  # SIGTERM, like Ctrl-C, removes the temporary folder
            writer = SampleSetWriter(tmp, n)
            yield writer
            writer.close()
            state.wait_for_everyone()
            if state.is_main_process:
                finish_sample_set(tmp, out, n, nrow, writer.settings)
    except BaseException:
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()
        if state.is_main_process:
            remove(tmp)
        raise
