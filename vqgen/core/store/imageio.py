"""Writing images: grids and single PNGs, through temporary files so nothing is half-written."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from vqgen.core.store.atomic import temporary_file, writing


def to_pil(image: Tensor) -> Image.Image:
    """(c, H, W) uint8 -> PIL image (grayscale for one channel)."""
    array = image.permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)


def save_png(image: Tensor, path: str | os.PathLike) -> None:
    """(c, H, W) uint8 -> a PNG at `path`, through a temporary file; a failed write is one VQGenError."""
    path = Path(path)
    tmp = None
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = temporary_file(path.parent, prefix=f".{path.stem}.", suffix=".png")
        os.close(fd)
    with writing(path, temporary=tmp):
        to_pil(image).save(tmp, format="PNG")
        os.replace(tmp, path)


def load_png(path: str | os.PathLike) -> Tensor:
    """A PNG written by `save_png` -> (c, H, W) uint8."""
    array = np.asarray(Image.open(path))
    return torch.from_numpy(array.copy()).unsqueeze(0) if array.ndim == 2 else torch.from_numpy(
        array.copy()).permute(2, 0, 1)


def png_size(image: Tensor) -> int:
    """Bytes of `image` (c, H, W) uint8 as a PNG."""
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="PNG")
    return buffer.tell()


def grid(images: Tensor, nrow: int = 8, padding: int = 2) -> Tensor:
    """(n, c, H, W) uint8 -> one (c, H', W') uint8 image, `nrow` images per row on a white background."""
    n, c, h, w = images.shape
    cols = max(1, min(nrow, n))
    rows = -(-n // cols)
    out = torch.full((c, padding + rows * (h + padding), padding + cols * (w + padding)), 255, dtype=torch.uint8)
    for i, image in enumerate(images):
        top, left = padding + (i // cols) * (h + padding), padding + (i % cols) * (w + padding)
        out[:, top:top + h, left:left + w] = image
    return out


def save_grid(images: Tensor, path: str | os.PathLike, nrow: int = 8) -> None:
    save_png(grid(images, nrow), path)
