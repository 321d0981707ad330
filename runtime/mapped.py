"""Read the runtime's constants (a safetensors file) without private copies of them.

The constants hold the lyric embedding table (``[vocab, text_hidden]``: 621 MB at the full-size geometry,
151669 x 1024 fp32) beside the text encoder's own copy in its graph. ``safetensors.numpy.load_file`` read the
whole table into private memory. Here small tensors are read-only views of one mapping of the file, and the
lyric table is a :class:`RowFile` that reads only the rows a lookup asks for. The values are the same bytes,
so results do not change. Layout (safetensors' documented format): an 8-byte little-endian header length, a
JSON header {name: {dtype, shape, data_offsets: [begin, end]}} (offsets from the end of the header), the data.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path

import numpy as np

from .errors import ArtifactError

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U8": np.uint8, "U16": np.uint16, "BOOL": np.bool_}
_MAX_HEADER = 100 << 20  # safetensors' own limit on the header size


def _layout(info: dict) -> tuple[np.dtype, tuple[int, ...], int]:
    """(little-endian dtype, shape, byte offset from the data start) of one header entry."""
    dtype = np.dtype(_DTYPES[info["dtype"]]).newbyteorder("<")
    return dtype, tuple(int(d) for d in info["shape"]), int(info["data_offsets"][0])


def _read_header(path: Path) -> tuple[dict, int]:
    """({name: header entry} without ``__metadata__``, byte offset of the data); ``ValueError`` if ``path`` is
    not valid safetensors."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) != 8:
            raise ValueError("file shorter than the safetensors header length")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(_MAX_HEADER, size - 8):
            raise ValueError(f"header length {length} does not fit the file")
        header = {k: v for k, v in json.loads(fh.read(length)).items() if k != "__metadata__"}
    start = 8 + length
    for name, info in header.items():
        dtype, shape, begin = _layout(info)
        end = int(info["data_offsets"][1])
        count = int(np.prod(shape, dtype=np.int64))
        if not 0 <= begin <= end <= size - start or end - begin != count * dtype.itemsize:
            raise ValueError(f"{name}: data offsets {begin}..{end} do not match shape {info['shape']} "
                             f"{info['dtype']}")
    return header, start


def load_mapped(path: str | Path, rows: tuple[str, ...] = ()) -> dict:
    """{name: read-only array viewing one read-only mapping of ``path``}; the 2-D tensors named in ``rows``
    come as :class:`RowFile` instead. ``ValueError``/``KeyError`` if the file is not valid safetensors."""
    path = Path(path)
    header, start = _read_header(path)
    with open(path, "rb") as fh:
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)  # stays valid after the file is closed
    arrays: dict = {}
    for name, info in header.items():
        dtype, shape, offset = _layout(info)
        if name in rows:
            if len(shape) != 2:
                raise ValueError(f"{name} has shape {shape}, not [rows, width]")
            arrays[name] = RowFile(os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)), start + offset,
                                   shape, dtype)
        else:
            count = int(np.prod(shape, dtype=np.int64))
            arrays[name] = np.frombuffer(mapped, dtype, count, start + offset).reshape(shape)
    return arrays


class RowFile:
    """A ``[rows, width]`` table of a safetensors file, read row by row on lookup (``os.pread``), never mapped.

    Pages of a mapping count in the resident set once touched, and the kernel maps a file's large page-cache
    folios whole (a freshly written file: a 2048-token lookup in a mapped 621 MB table made 592 MB resident).
    Reading the looked-up rows only keeps the table out of the resident set whatever the page cache holds.
    ``np.take(table, ids, axis=0)`` works on it (NumPy calls :meth:`take`). The descriptor stays open, so a
    re-export that replaces the file does not change what this table reads.
    """

    def __init__(self, fd: int, offset: int, shape: tuple[int, int], dtype: np.dtype):
        self._fd, self._offset = fd, offset
        self.shape, self.dtype, self.ndim = shape, dtype, 2
        self._row_bytes = shape[1] * dtype.itemsize

    def take(self, indices, axis: int = 0, out=None, mode: str = "raise") -> np.ndarray:
        """Rows ``indices`` (any shape of ints): ``[*indices.shape, width]``, as ``np.take(..., axis=0)``."""
        if axis != 0 or out is not None or mode != "raise":
            raise TypeError("RowFile.take supports axis=0, out=None, mode='raise' only")
        ids = np.asarray(indices, dtype=np.int64)
        rows = self.shape[0]
        if ids.size and (ids.min() < -rows or ids.max() >= rows):
            raise IndexError(f"index out of range for {rows} rows")
        unique, inverse = np.unique(ids % rows if ids.size else ids, return_inverse=True)
        table = np.empty((unique.size, self.shape[1]), self.dtype)
        for i, row in enumerate(unique.tolist()):
            data = os.pread(self._fd, self._row_bytes, self._offset + row * self._row_bytes)
            if len(data) != self._row_bytes:  # truncated in place since it was loaded (a re-export renames)
                raise ArtifactError("the constants file was truncated while this runtime used it.",
                                    "load the artifacts again (AceStepRuntime.load).")
            table[i] = np.frombuffer(data, self.dtype)
        return table[inverse.reshape(-1)].reshape(ids.shape + (self.shape[1],))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """The whole table (reads every row)."""
        whole = self.take(np.arange(self.shape[0]))
        return whole if dtype is None else whole.astype(dtype)

    def __del__(self):
        try:
            os.close(self._fd)
        except (OSError, AttributeError, TypeError):
            pass
