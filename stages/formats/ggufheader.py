"""A GGUF's header: scalar metadata, tensor element count, where tensor data begins.

gguf-py's GGUFReader builds a numpy view per vocabulary entry (seconds for a 49k-token
vocabulary); package and eval need only the scalars and the tensor shapes, read straight
from the header as the GGUF spec lays it out.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf

from ..build.errors import BuildError


@dataclass(frozen=True)
class Header:
    scalars: dict  # key → value, for every metadata value that is not an array
    elements: int  # weights in all tensors together
    data_offset: int  # where tensor data starts: the file's size minus this is the weights' bytes


_SCALARS = {
    gguf.GGUFValueType.UINT8: "<B", gguf.GGUFValueType.INT8: "<b", gguf.GGUFValueType.UINT16: "<H",
    gguf.GGUFValueType.INT16: "<h", gguf.GGUFValueType.UINT32: "<I", gguf.GGUFValueType.INT32: "<i",
    gguf.GGUFValueType.FLOAT32: "<f", gguf.GGUFValueType.BOOL: "<?", gguf.GGUFValueType.UINT64: "<Q",
    gguf.GGUFValueType.INT64: "<q", gguf.GGUFValueType.FLOAT64: "<d",
}


def scan(data) -> Header:
    """The header of a GGUF's bytes, skipping array values."""
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
    scalars = {}
    for _ in range(kv_count):
        key, value_type = take_str(), gguf.GGUFValueType(take("<I"))
        if value_type == gguf.GGUFValueType.STRING:
            scalars[key] = take_str()
        elif value_type == gguf.GGUFValueType.ARRAY:
            skip_array()
        else:
            scalars[key] = take(_SCALARS[value_type])
    elements = 0
    for _ in range(tensor_count):
        take_str()
        dims = [take("<Q") for _ in range(take("<I"))]
        take("<I"), take("<Q")  # type, data offset
        elements += math.prod(dims)
    alignment = int(scalars.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
    return Header(scalars, elements, -(-offset // alignment) * alignment)


def read(path: Path) -> Header:
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return scan(data)
    except (ValueError, struct.error, UnicodeDecodeError, OSError) as err:
        raise BuildError(f"{path} is not a readable GGUF file ({err}); rebuild it with `doit`") from None
