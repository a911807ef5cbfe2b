"""A GGUF's header: scalar metadata, where each array and tensor lies, where tensor data begins.

gguf-py's GGUFReader builds a numpy view per vocabulary entry (seconds for a 49k-token
vocabulary); package, eval and import need the scalars, a few arrays and the tensors' places,
read straight from the header as the GGUF spec lays it out. The numbers of a tensor are gguf-py's
to decode (`gguf.dequantize`).
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from ..ground.errors import BuildError


@dataclass(frozen=True)
class ArrayPlace:
    item_type: gguf.GGUFValueType
    count: int
    offset: int  # of the first item in the file


@dataclass(frozen=True)
class TensorPlace:
    name: str
    dims: tuple[int, ...]  # GGUF's order: the innermost (a row's length) first
    qtype: gguf.GGMLQuantizationType
    offset: int  # from the start of tensor data

    @property
    def nbytes(self) -> int:
        block, block_bytes = gguf.GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.dims) // block * block_bytes


@dataclass(frozen=True)
class Header:
    scalars: dict  # key → value, for every metadata value that is not an array
    elements: int  # weights in all tensors together
    data_offset: int  # where tensor data starts: the file's size minus this is the weights' bytes
    arrays: dict = field(default_factory=dict)  # key → ArrayPlace, for the array values
    tensors: tuple = ()  # TensorPlace of every tensor, in the file's order


_SCALARS = {
    gguf.GGUFValueType.UINT8: "<B", gguf.GGUFValueType.INT8: "<b", gguf.GGUFValueType.UINT16: "<H",
    gguf.GGUFValueType.INT16: "<h", gguf.GGUFValueType.UINT32: "<I", gguf.GGUFValueType.INT32: "<i",
    gguf.GGUFValueType.FLOAT32: "<f", gguf.GGUFValueType.BOOL: "<?", gguf.GGUFValueType.UINT64: "<Q",
    gguf.GGUFValueType.INT64: "<q", gguf.GGUFValueType.FLOAT64: "<d",
}


def scan(data) -> Header:
    """The header of a GGUF's bytes, skipping over array values (`array` reads one)."""
    offset = 0

    def take(fmt: str):
        nonlocal offset
        (value,) = struct.unpack_from(fmt, data, offset)
        offset += struct.calcsize(fmt)
        return value

    def take_str() -> str:
        nonlocal offset
        length = take("<Q")
        offset += length
        return bytes(data[offset - length:offset]).decode("utf-8")

    def skip_array():
        nonlocal offset
        item_type, count = gguf.GGUFValueType(take("<I")), take("<Q")
        if item_type == gguf.GGUFValueType.STRING:
            for _ in range(count):
                length = take("<Q")  # not `offset += take(...)`: that adds to the offset before the read
                offset += length
        elif item_type == gguf.GGUFValueType.ARRAY:
            for _ in range(count):
                skip_array()
        else:
            offset += count * struct.calcsize(_SCALARS[item_type])

    if bytes(data[:4]) != b"GGUF":
        raise ValueError("no GGUF magic")
    take("<4s"), take("<I")
    tensor_count, kv_count = take("<Q"), take("<Q")
    scalars, arrays = {}, {}
    for _ in range(kv_count):
        key, value_type = take_str(), gguf.GGUFValueType(take("<I"))
        if value_type == gguf.GGUFValueType.STRING:
            scalars[key] = take_str()
        elif value_type == gguf.GGUFValueType.ARRAY:
            item_type, count = gguf.GGUFValueType(struct.unpack_from("<I", data, offset)[0]), \
                struct.unpack_from("<Q", data, offset + 4)[0]
            arrays[key] = ArrayPlace(item_type, count, offset + 12)
            skip_array()
        else:
            scalars[key] = take(_SCALARS[value_type])
    tensors = []
    for _ in range(tensor_count):
        name = take_str()
        dims = tuple(take("<Q") for _ in range(take("<I")))
        tensors.append(TensorPlace(name, dims, gguf.GGMLQuantizationType(take("<I")), take("<Q")))
    alignment = int(scalars.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
    return Header(scalars, sum(math.prod(t.dims) for t in tensors), -(-offset // alignment) * alignment,
                  arrays, tuple(tensors))


def array(data, place: ArrayPlace) -> list:
    """An array value's items: strings decoded, numbers as Python numbers."""
    if place.item_type == gguf.GGUFValueType.STRING:
        items, offset = [], place.offset
        for _ in range(place.count):
            (length,) = struct.unpack_from("<Q", data, offset)
            items.append(bytes(data[offset + 8:offset + 8 + length]).decode("utf-8"))
            offset += 8 + length
        return items
    if place.item_type == gguf.GGUFValueType.ARRAY:
        raise ValueError("nested arrays are not read")
    return list(struct.unpack_from(f"<{place.count}{_SCALARS[place.item_type][1]}", data, place.offset))


def read(path: Path) -> Header:
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return scan(data)
    except (ValueError, struct.error, UnicodeDecodeError, OSError) as err:
        raise BuildError(f"{path} is not a readable GGUF file ({err}); rebuild it with `doit`") from None


class Mapped:
    """A GGUF file mapped for reading: its header, any metadata value, a tensor's bytes (as gguf-py's
    `dequantize` takes them: rows of raw bytes). Use it as a context manager."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "rb")
        try:
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            self.header = scan(self._map)
        except (ValueError, struct.error, UnicodeDecodeError, OSError):
            self.close()
            raise

    def __enter__(self) -> Mapped:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if getattr(self, "_map", None) is not None:
            try:
                self._map.close()
            except BufferError:  # arrays still view it (an error's traceback holds them): it closes with them
                pass
        self._file.close()

    def keys(self) -> list[str]:
        return [*self.header.scalars, *self.header.arrays]

    def value(self, key: str, default=None):
        if key in self.header.scalars:
            return self.header.scalars[key]
        if key in self.header.arrays:
            return array(self._map, self.header.arrays[key])
        return default

    def rows(self, tensor: TensorPlace):
        """The tensor's bytes, one row (its innermost dimension) per line; no copy."""
        import numpy as np

        start = self.header.data_offset + tensor.offset
        data = np.frombuffer(self._map, dtype=np.uint8, count=tensor.nbytes, offset=start)
        return data.reshape(math.prod(tensor.dims[1:]), -1)


def scalars(path: Path) -> dict:
    """A GGUF's scalar metadata (strings and numbers, not arrays), or {} for a file that is not a
    readable GGUF (the stage that imports it says what is wrong)."""
    try:
        with Mapped(path) as gguf_file:
            return dict(gguf_file.header.scalars)
    except (OSError, ValueError, struct.error, UnicodeDecodeError):
        return {}


def context_length(path: Path) -> int | None:
    """The context length a GGUF's model was trained for, from its header; None where it does not say."""
    found = scalars(path)
    found = found.get(f"{found.get('general.architecture')}.context_length")
    return int(found) if isinstance(found, int) else None
