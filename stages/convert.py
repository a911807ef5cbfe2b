"""convert: a Hugging Face safetensors model → one GGUF file, as llama.cpp's converter writes it.

Tensors stream one at a time from the safetensors shards (memory-mapped) into the GGUF,
so peak memory is about one tensor, never the model twice.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from tqdm import tqdm

from . import arch as arches
from . import tokenizer
from .atomic import atomic_file
from .errors import BuildError

# outtype → (GGUF file type, tensor type for 2-D weights)
OUTTYPES: dict[str, tuple[gguf.LlamaFileType, gguf.GGMLQuantizationType]] = {
    "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, gguf.GGMLQuantizationType.BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
}


@dataclass(frozen=True)
class TensorPlan:
    """One GGUF tensor: where it comes from and how it is written."""

    gguf_name: str
    hf_name: str
    shape: tuple[int, ...]  # Hugging Face (row-major) shape
    qtype: gguf.GGMLQuantizationType
    permute_heads: int = 0  # >0: llama.cpp's rotary row permutation with this many heads

    @property
    def nbytes(self) -> int:
        size, block_bytes = gguf.GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape)) // size * block_bytes


def permute_rotary(weights: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder q/k projection rows from Hugging Face's rotary halves to llama.cpp's interleaved pairs."""
    rows = weights.shape[0]
    return (
        weights.reshape(n_heads, 2, rows // n_heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def tensor_type(shape: tuple[int, ...], outtype: str) -> gguf.GGMLQuantizationType:
    """llama.cpp's rule: 1-D tensors (norms, biases) stay F32; Q8_0 needs rows of whole blocks."""
    if len(shape) < 2:
        return gguf.GGMLQuantizationType.F32
    qtype = OUTTYPES[outtype][1]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        return gguf.GGMLQuantizationType.F16
    return qtype


def plan_tensors(shapes: dict[str, tuple[int, ...]], config: dict, architecture: arches.Architecture, outtype: str,
                 where: str) -> list[TensorPlan]:
    """Map every Hugging Face tensor to its GGUF name, type and transform. Pure: no file access."""
    n_blocks = config["num_hidden_layers"]
    n_head = config["num_attention_heads"]
    n_head_kv = config.get("num_key_value_heads") or n_head
    names = gguf.get_tensor_name_map(architecture.gguf_arch, n_blocks)
    plans = []
    for hf_name, shape in shapes.items():
        if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue  # llama.cpp reads the tied output from token_embd
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from rope parameters
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise BuildError(f"{where}: tensor {hf_name!r} has no llama.cpp name for {architecture.gguf_name}; "
                             "is this checkpoint a plain causal LM without extra heads?")
        heads = 0
        if architecture.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            heads = n_head
        elif architecture.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            heads = n_head_kv
        plans.append(TensorPlan(gguf_name, hf_name, tuple(shape), tensor_type(tuple(shape), outtype), heads))
    return plans


def add_model_metadata(writer: gguf.GGUFWriter, config: dict, name: str, outtype: str) -> None:
    n_head = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise BuildError(f"{name}: rope scaling {rope.get('rope_type') or rope.get('type')!r} is not supported yet")
    writer.add_name(name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.get("num_key_value_heads") or n_head)
    writer.add_rope_freq_base(float(rope.get("rope_theta") or config.get("rope_theta") or 10000.0))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if "head_dim" in config:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(OUTTYPES[outtype][0])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BuildError(f"{path} not found: a Hugging Face model directory needs config.json") from None
    except json.JSONDecodeError as err:
        raise BuildError(f"{path}: not valid JSON ({err}); restore it from the model's source") from None


def _open_shards(model_dir: Path, stack) -> dict[str, object]:
    """tensor name → open safetensors handle, after checking every shard is whole."""
    from safetensors import safe_open

    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        pickles = sorted(p.name for p in model_dir.glob("*.bin"))
        hint = f" (found pickle weights {', '.join(pickles)}: re-save them with safe_serialization=True)" if pickles else ""
        raise BuildError(f"{model_dir}: no *.safetensors weights{hint}")
    handles = {}
    for shard in shards:
        check_safetensors(shard)
        handle = stack.enter_context(safe_open(shard, framework="pt"))
        handles.update(dict.fromkeys(handle.keys(), handle))
    return handles


def check_safetensors(path: Path) -> None:
    """Refuse a corrupt or truncated shard up front: safetensors maps lazily and would
    otherwise fail halfway through writing the GGUF."""
    size = path.stat().st_size
    problem = None
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


def _tensor_bytes(plan: TensorPlan, handle) -> np.ndarray:
    import torch

    data = handle.get_tensor(plan.hf_name)
    if plan.permute_heads:
        data = permute_rotary(data, plan.permute_heads)
    # torch casts to f16/f32 several times faster than numpy; the block formats are gguf-py's.
    if plan.qtype == gguf.GGMLQuantizationType.F16:
        return data.to(torch.float16).numpy()
    data = data.to(torch.float32).numpy()
    return data if plan.qtype == gguf.GGMLQuantizationType.F32 else gguf.quants.quantize(data, plan.qtype)


def run(model_dir: Path, out_path: Path, outtype: str, name: str, pretokenizer: str | None = None) -> None:
    """Write `out_path` (GGUF at `outtype`) from the Hugging Face model in `model_dir`."""
    model_dir, out_path = Path(model_dir), Path(out_path)
    config = _read_config(model_dir)
    architecture = arches.from_hf_config(config, str(model_dir / "config.json"))
    with contextlib.ExitStack() as stack:
        handles = _open_shards(model_dir, stack)
        shapes = {k: tuple(handles[k].get_slice(k).get_shape()) for k in sorted(handles)}
        plans = plan_tensors(shapes, config, architecture, outtype, str(model_dir))
        with atomic_file(out_path) as tmp:
            writer = gguf.GGUFWriter(tmp, architecture.gguf_name)
            add_model_metadata(writer, config, name, outtype)
            tokenizer.add_to_gguf(writer, model_dir, config["vocab_size"], pretokenizer)
            for plan in plans:
                byte_shape = gguf.quants.quant_shape_to_byte_shape(plan.shape, plan.qtype)
                writer.add_tensor_info(plan.gguf_name, byte_shape, np.dtype(np.uint8), plan.nbytes, raw_dtype=plan.qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for plan in tqdm(plans, desc=f"convert {name}", unit="tensor", leave=False):
                writer.write_tensor_data(_tensor_bytes(plan, handles[plan.hf_name]))
            writer.close()
