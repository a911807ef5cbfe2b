"""The Hugging Face model folder: config.json and safetensors shards, read without loading weights."""

from __future__ import annotations

import json
from pathlib import Path

from ..build.errors import BuildError


def read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BuildError(f"{path} not found: a Hugging Face model directory needs config.json") from None
    except json.JSONDecodeError as err:
        raise BuildError(f"{path}: not valid JSON ({err}); restore it from the model's source") from None


def headers(model_dir: Path) -> dict[Path, dict]:
    """Every safetensors shard of a model with its header, each shard checked whole; pickles are refused."""
    found = sorted(model_dir.glob("*.safetensors"))
    if not found:
        pickles = sorted(p.name for p in model_dir.glob("*.bin"))
        hint = f" (found pickle weights {', '.join(pickles)}: re-save them with safe_serialization=True)" if pickles else ""
        raise BuildError(f"{model_dir}: no *.safetensors weights{hint}")
    return {shard: read_header(shard) for shard in found}


def read_header(path: Path) -> dict:
    """A safetensors header, after checking the file holds all the data it promises.

    safetensors maps lazily, so a corrupt or truncated shard would otherwise fail halfway
    through writing an output."""
    size = path.stat().st_size
    problem, header = None, {}
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if size < 8 or 8 + header_len > size:
            problem = f"its header claims {header_len} bytes but the file has {size}"
        else:
            try:
                header = json.loads(f.read(header_len))
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                problem = f"its header is not valid safetensors JSON ({err})"
            else:
                if 8 + header_len + end > size:
                    problem = f"truncated: {size} bytes, the header needs {8 + header_len + end}"
    if problem:
        raise BuildError(f"{path}: not a valid safetensors file, {problem}; "
                         "rebuild it or restore it from the model's source")
    header.pop("__metadata__", None)
    return header


def tensor_shapes(shard_headers: dict[Path, dict]) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape, from the shard headers alone."""
    return {name: tuple(info["shape"]) for header in shard_headers.values() for name, info in header.items()}
