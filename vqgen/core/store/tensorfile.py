"""One tensor in safetensors format, written a slice of rows at a time.

The header goes first and the file is sized for the whole tensor; each slice of rows is then written
at its offset, by whichever process drew it. The result is an ordinary safetensors file
(`safetensors.torch.load_file` reads it), made without ever holding the whole tensor in memory.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch
from torch import Tensor

_DTYPES = {torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64", torch.float32: "F32"}


def create_tensor_file(path: str | os.PathLike, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """Write the header of one tensor `name` of `shape` and `dtype`; its rows are zero until written."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    header = json.dumps({name: {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [0, nbytes]}},
                        separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        f.truncate(8 + len(header) + nbytes)


class TensorFileRows:
    """Writes rows of the tensor in a file made by `create_tensor_file` (disjoint rows: any process)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = open(self.path, "r+b")
        (size,) = struct.unpack("<Q", self._file.read(8))
        (self.name, entry), = json.loads(self._file.read(size)).items()
        self.shape = tuple(entry["shape"])
        self.dtype = next(d for d, code in _DTYPES.items() if code == entry["dtype"])
        self._start = 8 + size
        self._row_bytes = math.prod(self.shape[1:]) * torch.empty((), dtype=self.dtype).element_size()

    def write(self, first: int, rows: Tensor) -> None:
        """Rows `first`, `first + 1`, ... of the tensor."""
        assert tuple(rows.shape[1:]) == self.shape[1:] and 0 <= first and first + len(rows) <= self.shape[0], \
            f"rows {tuple(rows.shape)} at {first} do not fit a tensor of shape {self.shape}"
        array = rows.to(self.dtype).contiguous().numpy()
        self._file.seek(self._start + first * self._row_bytes)
        self._file.write(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())

    def close(self) -> None:
        """Flush the rows to disk."""
        if self._file.closed:
            return
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()
