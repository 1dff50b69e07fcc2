"""Decoding: references to pixels, every image brought to one mode ("L" or "RGB") and one size."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vqgen.core.data.config import DataConfig
from vqgen.core.data.sources import RawSplit
from vqgen.core.runtime.errors import VQGenError, one_line


def _why(err: BaseException) -> str:
    return "not a recognised image format" if isinstance(err, UnidentifiedImageError) else one_line(err)


def _array_image(a: np.ndarray) -> Image.Image:
    """(h, w) or (h, w, c) integers in 0..255 -> a PIL image."""
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ValueError(f"pixel array of shape {a.shape}, expected (h, w) or (h, w, 1|3|4)")
    if a.dtype != np.uint8 and (a.dtype.kind not in "iu" or a.min() < 0 or a.max() > 255):
        raise ValueError(f"pixel array of {a.dtype} values, expected integers 0..255")
    return Image.fromarray(a.astype(np.uint8))


def _open(ref: Any) -> Image.Image:
    if isinstance(ref, np.ndarray):
        return _array_image(ref)
    if ref is None:
        raise ValueError("no image data")
    data = Path(ref).read_bytes() if isinstance(ref, str) else ref  # bytes: no file handle left open
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def _normalise(img: Image.Image) -> Image.Image:
    """Any mode -> "L" (grey) or "RGB"; transparency is composited onto black."""
    if img.mode in ("L", "RGB"):
        return img
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "RGB")
    if img.mode == "1":
        return img.convert("L")
    if img.mode.startswith("I;16"):  # 16-bit grey
        return Image.fromarray((np.asarray(img) >> 8).astype(np.uint8))
    if img.mode in ("I", "F"):
        return Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8))
    if img.mode in ("LA", "RGBA"):
        colour = img.convert(img.mode[:-1])
        canvas = Image.new(colour.mode, img.size, 0)
        canvas.paste(colour, mask=img.getchannel("A"))
        return canvas
    return img.convert("RGB")  # RGB, CMYK, YCbCr, LAB, HSV, ...


def _fit(img: Image.Image, size: int | None, mode: str) -> Image.Image:
    """Bring an image to size x size: stretch, resize the shorter side and crop, or pad with zeros."""
    if size is None or img.size == (size, size):
        return img
    if mode == "resize":
        return img.resize((size, size), Image.Resampling.BICUBIC)  # antialiased when shrinking
    if mode == "center-crop":
        return ImageOps.fit(img, (size, size), Image.Resampling.BICUBIC)
    canvas = Image.new(img.mode, (size, size), 0)
    canvas.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
    return canvas


def pixels(raw: RawSplit, i: int, cfg: DataConfig) -> np.ndarray:
    """Image i of a split, decoded, as uint8 (h, w, c) with c in {1, 3}."""
    try:
        img = _normalise(_open(raw.refs[i]))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise VQGenError(f"cannot read image {raw.where(i)}: {_why(err)}") from None
    size = cfg.image_size
    if size is not None and cfg.resize_mode == "pad" and (img.width > size or img.height > size):
        raise VQGenError(
            f"image {raw.where(i)} is {img.width}x{img.height}, larger than image_size={size}; "
            "resize_mode='pad' only pads"
        )
    px = np.asarray(_fit(img, size, cfg.resize_mode))
    return px[:, :, None] if px.ndim == 2 else px


def size_error(a: tuple[str, tuple[int, ...]], b: tuple[str, tuple[int, ...]]) -> VQGenError:
    (where_a, (ha, wa)), (where_b, (hb, wb)) = a, b
    return VQGenError(
        f"images differ in size: {wa}x{ha} ({where_a}) and {wb}x{hb} ({where_b}); "
        "give --image-size N (image_size) to unify them"
    )


def decode_split(raw: RawSplit, cfg: DataConfig) -> np.ndarray:
    """Decode every image of a split -> uint8 (n, c, h, w); grey becomes RGB once a colour image appears."""
    out = None
    for i in range(len(raw.refs)):
        px = pixels(raw, i, cfg)  # (h, w, c)
        if out is None:
            out = np.empty((len(raw.refs), px.shape[2], px.shape[0], px.shape[1]), dtype=np.uint8)
        elif px.shape[:2] != out.shape[2:]:
            raise size_error((raw.where(0), out.shape[2:]), (raw.where(i), px.shape[:2]))
        if px.shape[2] > out.shape[1]:
            out = np.repeat(out, px.shape[2], axis=1)  # (n, 3, h, w)
        out[i] = px.transpose(2, 0, 1)  # grey broadcasts into RGB
    return out



def decode_one(raw: RawSplit, i: int, cfg: DataConfig, shape: tuple[int, int, int]) -> np.ndarray:
    """Image i of a streamed split as uint8 (c, h, w) of the split's `shape`: grey is repeated into RGB,
    colour brought to grey, a different size refused (a streamed split cannot look ahead to unify them)."""
    px = pixels(raw, i, cfg)  # (h, w, c)
    c, h, w = shape
    if px.shape[:2] != (h, w):
        raise size_error((f"the first image of {raw.origin}", (h, w)), (raw.where(i), px.shape[:2]))
    if px.shape[2] != c:
        px = px.repeat(3, axis=2) if c == 3 else np.asarray(Image.fromarray(px).convert("L"))[:, :, None]
    return px.transpose(2, 0, 1)
