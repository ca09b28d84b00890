"""A GGUF file's header (metadata and tensor table) read in one pass with `struct`.

gguf's GGUFReader builds a numpy view for every item of every field: on a 49k-token vocabulary (tokens and
merges arrays) that took 10 to 25 s per file, and export, the template check and deploy each read the GGUFs
again. This reader parses the same header in a fraction of a second and never touches the tensor data.
Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (little-endian, versions 2 and 3).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAGIC = b"GGUF"
STRING, ARRAY = 8, 9
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


class GGUFHeaderError(ValueError):
    """Not a GGUF file, or its header is cut short or malformed."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    type_id: int

    @property
    def n_elements(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count

    @property
    def type_name(self) -> str:
        from gguf.constants import GGMLQuantizationType

        return GGMLQuantizationType(self.type_id).name.lower()

    @property
    def n_bytes(self) -> int:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(self.type_id)]
        return self.n_elements // block_size * type_size


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]


class _Cursor:
    def __init__(self, buffer):
        self.buffer, self.offset = buffer, 0

    def unpack(self, fmt: str):
        values = struct.unpack_from("<" + fmt, self.buffer, self.offset)
        self.offset += struct.calcsize("<" + fmt)
        return values

    def string(self) -> str:
        (length,) = self.unpack("Q")
        start, self.offset = self.offset, self.offset + length
        if self.offset > len(self.buffer):
            raise struct.error("string runs past the end of the file")
        return bytes(self.buffer[start : self.offset]).decode("utf-8", errors="replace")

    def value(self, type_id: int):
        if type_id == STRING:
            return self.string()
        if type_id == ARRAY:
            item_type, count = self.unpack("IQ")
            if item_type in SCALARS:
                return list(self.unpack(f"{count}{SCALARS[item_type]}"))
            return [self.value(item_type) for _ in range(count)]
        if type_id in SCALARS:
            return self.unpack(SCALARS[type_id])[0]
        raise GGUFHeaderError(f"unknown metadata value type {type_id}")


def read_header(path: Path) -> GGUFHeader:
    """The metadata (key -> value; arrays as lists) and the tensor table; GGUFHeaderError when it is not one."""
    with open(path, "rb") as file:
        try:
            buffer = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file cannot be mapped
            raise GGUFHeaderError(f"{path}: empty file") from None
        with buffer:
            return _parse(buffer, path)


def read_gguf_field(path: Path, key: str) -> Any:
    """One metadata value of a GGUF file (None when absent)."""
    return read_header(path).metadata.get(key)


def _parse(buffer, path: Path) -> GGUFHeader:
    if buffer[:4] != MAGIC:
        raise GGUFHeaderError(f"{path}: not a GGUF file (starts with {bytes(buffer[:4])!r})")
    cursor = _Cursor(buffer)
    cursor.offset = 4
    try:
        version, tensor_count, kv_count = cursor.unpack("IQQ")
        if version not in (2, 3):
            raise GGUFHeaderError(f"{path}: GGUF version {version} (big-endian or unknown); expected 2 or 3")
        metadata = {}
        for _ in range(kv_count):
            key = cursor.string()
            (type_id,) = cursor.unpack("I")
            metadata[key] = cursor.value(type_id)
        tensors = []
        for _ in range(tensor_count):
            name = cursor.string()
            (n_dims,) = cursor.unpack("I")
            shape = cursor.unpack(f"{n_dims}Q")
            type_id, _offset = cursor.unpack("IQ")
            tensors.append(TensorInfo(name, tuple(shape), type_id))
    except (struct.error, OverflowError, MemoryError) as exc:
        raise GGUFHeaderError(f"{path}: header cut short or malformed ({exc})") from None
    return GGUFHeader(version, metadata, tensors)
