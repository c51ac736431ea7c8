"""A GGUF header reader that skips what the frozen layer does not need.

gguf's own GGUFReader builds a numpy view for every part of every metadata value, and a small
LLM's GGUF carries its whole tokenizer there (SmolLM2: 49,152 token strings and 48,900 merges):
on 2 CPU cores that takes ~4 s per open, twice per load (Transformers' config parser opens the
file again), while the one decoder layer we read takes ~0.1 s. This reader walks the header
with struct on a memory map, keeps scalar values and short arrays, and for long arrays keeps
only their element type and length. Tensor data is never read here: `tensor_bytes` returns a
numpy view of one tensor's bytes, shaped as gguf.quants.dequantize expects them.

Format (GGUF v2 and v3, little-endian; the layout llama.cpp's gguf.md specifies): magic "GGUF",
uint32 version, uint64 tensor count, uint64 key/value count, the key/value pairs (string key,
uint32 value type, value), the tensor infos (string name, uint32 n_dims, uint64 dims, innermost
first, uint32 ggml type, uint64 offset), then the data, which starts at the next multiple of
`general.alignment` (32 if absent); tensor offsets count from there.
"""
from __future__ import annotations

import dataclasses
import mmap
import struct
from pathlib import Path

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

# metadata value types: code -> (struct format, size) for the fixed-size ones
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
            6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_STRING, _ARRAY = 8, 9
KEEP_ARRAY = 64  # arrays up to this many elements are kept; longer ones only as LongArray


class GGUFFormatError(ValueError):
    """The bytes are not a GGUF header this reader understands (cut, corrupt, other format)."""


@dataclasses.dataclass(frozen=True)
class LongArray:
    """A metadata array too long to be worth decoding here (a tokenizer's vocabulary)."""
    element_type: int
    length: int


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # GGUF order: innermost (contiguous) dimension first
    ggml_type: int
    start: int  # absolute byte offset in the file
    nbytes: int


@dataclasses.dataclass
class GGUFHeader:
    path: Path
    version: int
    fields: dict  # key -> int | float | bool | str | list | LongArray
    tensors: list[TensorInfo]
    data_start: int
    file_size: int

    def truncated(self) -> TensorInfo | None:
        """The first tensor (in file order) whose bytes run past the end of the file."""
        for t in sorted(self.tensors, key=lambda t: t.start):
            if t.start + t.nbytes > self.file_size:
                return t
        return None


class _Cursor:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str, size: int):
        if self.pos + size > len(self.buf):
            raise GGUFFormatError(f"the header ends early: needed {size} bytes at offset "
                                  f"{self.pos:,} of {len(self.buf):,}")
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("<Q", 8)
        if self.pos + n > len(self.buf):
            raise GGUFFormatError(f"a string of {n:,} bytes at offset {self.pos:,} runs past "
                                  f"the end ({len(self.buf):,} bytes)")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        n = self.take("<Q", 8)  # (not `self.pos += self.take(...)`: take moves pos first)
        self.pos += n

    def value(self, kind: int):
        if kind in _SCALARS:
            return self.take(*_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            element, length = self.take("<I", 4), self.take("<Q", 8)
            if length <= KEEP_ARRAY:
                return [self.value(element) for _ in range(length)]
            if element in _SCALARS:
                self.pos += length * _SCALARS[element][1]
            elif element == _STRING:
                for _ in range(length):
                    self.skip_string()
            else:  # arrays of arrays: walk them
                for _ in range(length):
                    self.value(element)
            if self.pos > len(self.buf):
                raise GGUFFormatError(f"an array of {length:,} elements runs past the end")
            return LongArray(element, length)
        raise GGUFFormatError(f"unknown metadata value type {kind} at offset {self.pos - 4:,}")


def read_header(path) -> GGUFHeader:
    """Parse a GGUF file's header (metadata and tensor infos); GGUFFormatError if it cannot."""
    path = Path(path)
    size = path.stat().st_size
    if size < 24:
        raise GGUFFormatError(f"{size} bytes: too short for a GGUF header")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = _Cursor(buf)
        if bytes(buf[:4]) != b"GGUF":
            raise GGUFFormatError(f"no GGUF magic (starts with {bytes(buf[:4])!r})")
        cur.pos = 4
        version = cur.take("<I", 4)
        if version not in (2, 3):
            raise GGUFFormatError(f"GGUF version {version} (big-endian or unsupported; this "
                                  "reader knows little-endian versions 2 and 3)")
        n_tensors, n_fields = cur.take("<Q", 8), cur.take("<Q", 8)
        fields = {}
        for _ in range(n_fields):
            key = cur.string()
            fields[key] = cur.value(cur.take("<I", 4))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = tuple(cur.take("<Q", 8) for _ in range(cur.take("<I", 4)))
            infos.append((name, dims, cur.take("<I", 4), cur.take("<Q", 8)))
        align = int(fields.get("general.alignment", 32))
        data_start = -(-cur.pos // align) * align
    tensors = []
    for name, dims, kind, offset in infos:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            raise GGUFFormatError(f"tensor {name}: unknown ggml type {kind}") from None
        count = int(np.prod(dims)) if dims else 1
        tensors.append(TensorInfo(name, dims, kind, data_start + offset,
                                  count // block * type_size))
    return GGUFHeader(path, version, fields, tensors, data_start, size)


def tensor_bytes(header: GGUFHeader, info: TensorInfo) -> np.ndarray:
    """A tensor's stored bytes as a read-only numpy view of the memory-mapped file, shaped
    (outer dims..., bytes per innermost row), the shape gguf.quants.dequantize takes."""
    outer = tuple(reversed(info.dims[1:]))
    row_bytes = info.nbytes // int(np.prod(outer))  # (read_header sized nbytes by type)
    data = np.memmap(header.path, dtype=np.uint8, mode="r", offset=info.start,
                     shape=(info.nbytes,))
    return data.reshape(outer + (row_bytes,))
