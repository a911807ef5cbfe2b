"""The Hugging Face model folder: config.json and safetensors shards, read without loading weights,
and written a tensor at a time."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..ground.errors import BuildError

# The parts of a vision-language model that are not its language model, as transformers and the hub
# name them (Gemma 3, Qwen2.5-VL, Mistral 3, SmolVLM, LLaVA): a LoRA trained on text adapts none of them.
VISION_PARTS = ("vision_tower", "visual", "vision_model", "multi_modal_projector")


def is_vision(name: str) -> bool:
    """Whether a module or weight name belongs to a vision tower or its projector."""
    return any(part in VISION_PARTS for part in name.split("."))


def language_model_class(config):
    """The transformers class that loads a checkpoint with its language-model head:
    AutoModelForCausalLM, or AutoModelForImageTextToText for the vision-language models it does not
    take (Qwen2.5-VL, Mistral 3; Gemma 3's it does). `config`: a transformers config."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return transformers.AutoModelForCausalLM
    return transformers.AutoModelForImageTextToText


def refuse_non_finite(values, tensor: str, source, what: str) -> None:
    """A weight holding NaN or infinity is refused where it enters the build: llama.cpp would quantize
    it without a word and the released model would answer garbage (or crash its quantizer much later).
    `values`: a torch tensor or numpy array; `source`: the file it came from; `what`: the way out."""
    import numpy as np

    if hasattr(values, "is_floating_point"):  # torch
        import torch

        finite = not values.is_floating_point() or bool(torch.isfinite(values).all())
    else:
        finite = not np.issubdtype(values.dtype, np.floating) or bool(np.isfinite(values).all())
    if not finite:
        raise BuildError(f"{source}: tensor {tensor!r} holds NaN or infinite values: the weights are broken, and "
                         f"nothing built from them would work; {what}")


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


SHARD_BYTES = 5 * 10**9  # the hub's usual shard size
ELEMENT_BYTES = {"F32": 4, "F16": 2, "BF16": 2}


def tensor_bytes(shape: tuple[int, ...], dtype: str) -> int:
    return ELEMENT_BYTES[dtype] * math.prod(shape)


def plan_shards(shapes: dict[str, tuple[int, ...]], dtype: str, limit: int | None = None) -> dict[str, list[str]]:
    """Shard file name → its tensors (all of `dtype`), in name order, each shard under `limit` bytes
    (SHARD_BYTES; one tensor may exceed it alone), named as transformers names them."""
    limit = limit or SHARD_BYTES
    groups: list[list[str]] = [[]]
    size = 0
    for name in sorted(shapes):
        nbytes = tensor_bytes(shapes[name], dtype)
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    if len(groups) == 1:
        return {"model.safetensors": groups[0]}
    return {f"model-{i:05d}-of-{len(groups):05d}.safetensors": group for i, group in enumerate(groups, 1)}


def safetensors_header(shapes: dict[str, tuple[int, ...]], dtype: str) -> bytes:
    """The first bytes of a safetensors file of these tensors, all of `dtype`, byte for byte what
    safetensors' own writer puts there: the header length, then compact JSON with `__metadata__`
    first and tensors by name, padded with spaces to 8 bytes. The data follows in the same order;
    writing it a tensor at a time keeps a shard out of memory, which `save_file` needs whole."""
    entries: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(shapes):
        end = offset + tensor_bytes(shapes[name], dtype)
        entries[name] = {"dtype": dtype, "shape": list(shapes[name]), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def shard_index(shards: dict[str, list[str]], shapes: dict[str, tuple[int, ...]], dtype: str) -> dict:
    """model.safetensors.index.json for a sharded folder."""
    return {"metadata": {"total_size": sum(tensor_bytes(shape, dtype) for shape in shapes.values())},
            "weight_map": {name: shard for shard, names in shards.items() for name in sorted(names)}}
