"""convert: a Hugging Face safetensors model → one GGUF file, as llama.cpp's converter writes it.

Three converters, one per model (`ModelBuild.converter`):
- modelmake's own (`run`), for the families it has a plan for: tensors stream one at a time from the
  safetensors shards (memory-mapped) into the GGUF, so peak memory is about one tensor, never the
  model twice. Given an adapter (`[models.merge] keep_hf = false`), each adapted weight is merged as
  it streams past, exactly as the merge stage computes it, so the merged GGUF has the same bytes
  without the merged safetensors ever being written.
- llama.cpp's own `convert_hf_to_gguf.py` from the pinned source (`run_pinned`), for every other
  architecture it knows (mixtures of experts, whatever llama.cpp added last month), or for any model
  with `[models.convert] engine = "llama.cpp"`.
- the spec's own command (`run_external`), for whoever wants their own llama.cpp.
"""

from __future__ import annotations

import contextlib
import subprocess
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from .formats import arch as arches
from .formats import ggufheader, hf, lora, tokenizer
from .ground import llamacpp
from .ground.atomic import atomic_file
from .ground.errors import BuildError
from .ground.hashing import INDEX
from .ground.progress import bar
from .ground.task import ModelBuild, Task
from .merge import merged_weight

REVISION = 1
TOOLS = ("gguf", "safetensors", "torch", "transformers", "tokenizers", "numpy")

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
    offset: float = 0.0  # added to every value (Gemma's norms)

    @property
    def nbytes(self) -> int:
        size, block_bytes = gguf.GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape)) // size * block_bytes


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
    names = gguf.get_tensor_name_map(architecture.gguf_arch, config["num_hidden_layers"])
    plans = []
    for hf_name, shape in shapes.items():
        if architecture.skips(hf_name, config):
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise BuildError(f"{where}: tensor {hf_name!r} has no llama.cpp name for {architecture.gguf_name}; "
                             "is this checkpoint a plain causal LM without extra heads?")
        plans.append(TensorPlan(gguf_name, hf_name, tuple(shape), tensor_type(tuple(shape), outtype),
                                architecture.rotary_heads(hf_name, config), architecture.norm_offset(hf_name)))
    return plans


def add_model_metadata(writer: gguf.GGUFWriter, config: dict, architecture: arches.Architecture, name: str,
                       outtype: str) -> None:
    """The hyperparameters every family shares, then the family's own."""
    n_head = config["num_attention_heads"]
    scaling, rope = arches.rope_of(config)
    if scaling == "linear":  # DeepSeek-Coder, Gemma 3's global layers: positions divided by `factor`
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_name(name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.get("num_key_value_heads") or n_head)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if "head_dim" in config:
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    writer.add_rope_dimension_count(architecture.rope_dimensions(config))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(OUTTYPES[outtype][0])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    architecture.add_metadata(writer, config)


def _open_shards(model_dir: Path, stack) -> dict[str, tuple[Path, object]]:
    """tensor name → (its shard, the shard's open safetensors handle)."""
    from safetensors import safe_open

    handles = {}
    for shard in hf.headers(model_dir):
        handle = stack.enter_context(safe_open(shard, framework="pt"))
        handles.update(dict.fromkeys(handle.keys(), (shard, handle)))
    return handles


def _tensor_bytes(plan: TensorPlan, data, adapter: lora.Adapter | None) -> np.ndarray:
    """The GGUF bytes of one weight (`data`, the checkpoint's tensor) at the plan's type."""
    import torch

    if adapter and plan.hf_name in adapter.pairs:
        if not data.is_floating_point():
            raise BuildError(f"{plan.hf_name} is {data.dtype}; LoRA merges into float weights only")
        data = merged_weight(data, *adapter.pairs[plan.hf_name], adapter.scale)
    if plan.offset:  # in float32: a bf16 1 + w would round w away
        data = data.to(torch.float32) + plan.offset
    if plan.permute_heads:
        data = arches.permute_rotary(data, plan.permute_heads)
    # torch casts to f16/f32/bf16 several times faster than numpy; the block formats are gguf-py's.
    if plan.qtype == gguf.GGMLQuantizationType.F16:
        half = data.to(torch.float16)
        if not torch.isfinite(half).all():  # finite before (checked on the way in): beyond float16's ±65504
            raise BuildError(f"{plan.hf_name} holds values up to {data.abs().max().item():.3g}, beyond float16's "
                             "largest (65504), so its F16 GGUF would hold infinities that llama.cpp refuses; write "
                             "outtype = \"bf16\" or \"f32\", or, for a fine-tune, train with a lower learning_rate "
                             "(weights this large mean training diverged)")
        return half.numpy()
    if plan.qtype == gguf.GGMLQuantizationType.BF16 and not torch.isnan(data).any():
        # torch rounds to nearest even as ggml (and gguf-py) do; they differ only on NaN payloads,
        # which take gguf-py's way below. A bf16 checkpoint's bytes pass through unchanged.
        return data.to(torch.bfloat16).view(torch.int16).numpy()
    data = data.to(torch.float32).numpy()
    return data if plan.qtype == gguf.GGMLQuantizationType.F32 else gguf.quants.quantize(data, plan.qtype)


def run(model_dir: Path, out_path: Path, outtype: str, name: str, pretokenizer: str | None = None,
        adapter_dir: Path | None = None, allow_pickle: bool = False, chat_template: str | None = None) -> None:
    """Write `out_path` (GGUF at `outtype`) from the Hugging Face model in `model_dir`, with the
    PEFT adapter in `adapter_dir` merged in if one is given, and `chat_template` (the format it was
    trained on) in place of the folder's own if one is given."""
    model_dir, out_path = Path(model_dir), Path(out_path)
    config = hf.read_config(model_dir)
    architecture = arches.from_hf_config(config, str(model_dir / "config.json"))
    adapter = lora.load(Path(adapter_dir), allow_pickle) if adapter_dir else None
    with contextlib.ExitStack() as stack:
        handles = _open_shards(model_dir, stack)
        shapes = {k: tuple(handles[k][1].get_slice(k).get_shape()) for k in sorted(handles)}
        if adapter:
            adapter = lora.fit(adapter, shapes, model_dir)
        plans = plan_tensors(shapes, config, architecture, outtype, str(model_dir))
        with atomic_file(out_path) as tmp:
            writer = gguf.GGUFWriter(tmp, architecture.gguf_name)
            add_model_metadata(writer, config, architecture, name, outtype)
            tokenizer.add_to_gguf(writer, model_dir, config["vocab_size"], pretokenizer, architecture.add_space_prefix,
                                  chat_template)
            extra = architecture.computed_tensors(config)
            for tensor_name, values in extra.items():
                writer.add_tensor_info(tensor_name, values.shape, values.dtype, values.nbytes)
            for plan in plans:
                byte_shape = gguf.quants.quant_shape_to_byte_shape(plan.shape, plan.qtype)
                writer.add_tensor_info(plan.gguf_name, byte_shape, np.dtype(np.uint8), plan.nbytes, raw_dtype=plan.qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for values in extra.values():
                writer.write_tensor_data(values)
            for plan in bar(plans, desc=f"convert {name}", unit="tensor"):
                shard, handle = handles[plan.hf_name]
                data = handle.get_tensor(plan.hf_name)
                hf.refuse_non_finite(data, plan.hf_name, shard, "use an intact copy of the model")
                writer.write_tensor_data(_tensor_bytes(plan, data, adapter))
            writer.close()


def run_external(command: list[str], model_dir: Path, out_path: Path, outtype: str, cwd: Path) -> None:
    """Run the spec's converter (llama.cpp's convert_hf_to_gguf.py, say) into a temporary file, check
    that what it wrote is a GGUF, then rename it into place like any other output."""
    with atomic_file(out_path) as tmp:
        argv = [arg.format(model_dir=model_dir, out=tmp, outtype=outtype) for arg in command]
        try:
            proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
        except OSError as err:
            raise BuildError(f"the external converter {argv[0]!r} cannot be started ({err.strerror}); "
                             "check [models.convert] command") from None
        if proc.returncode != 0:
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
            raise BuildError(f"the external converter failed ({llamacpp.exit_words(proc.returncode)}) on {model_dir}: {tail}")
        if not tmp.is_file():
            raise BuildError(f"the external converter exited 0 but wrote nothing to {{out}}; check [models.convert] "
                             f"command (it ran: {' '.join(argv)})")
        header = ggufheader.read(tmp)
        print(f"{out_path.name}: {header.scalars.get('general.architecture', '?')}, {header.elements:,} weights, "
              f"by {' '.join(command[:2])}")


def run_pinned(model_dir: Path, out_path: Path, outtype: str, name: str, mmproj: bool = False) -> None:
    """llama.cpp's convert_hf_to_gguf.py from the pinned source, with its own gguf-py, into a temporary
    file that must read back as a GGUF before it is renamed into place. `mmproj`: the vision tower and
    projector of a vision-language model instead of its language model."""
    out_path = Path(out_path)
    with atomic_file(out_path) as tmp:
        args = [str(Path(model_dir).absolute()), "--outfile", str(tmp.absolute()), "--outtype", outtype,
                "--model-name", name, *(["--mmproj"] if mmproj else [])]
        llamacpp.convert("convert_hf_to_gguf.py", args, f"convert {model_dir}" + (" (--mmproj)" if mmproj else ""))
        if not tmp.is_file():
            raise BuildError(f"llama.cpp's convert_hf_to_gguf.py exited 0 but wrote no GGUF for {model_dir}")
        header = ggufheader.read(tmp)
    print(f"{out_path.name}: {header.scalars.get('general.architecture', '?')}, {header.elements:,} weights, "
          f"by llama.cpp's convert_hf_to_gguf.py (llama-cpp-python {llamacpp.installed_version()})")


def gguf_of(paths, stem: str, variant: str) -> Path:
    """The base's GGUF lives with the base (a matrix's variants share it); any other with its model."""
    return paths.base_gguf(variant) if stem == paths.base_name else paths.gguf(stem, variant)


def tasks(build: ModelBuild) -> list[Task]:
    """The base's GGUF, and with an adapter the merged model's: the release route starts from it,
    converted from the merge stage's folder, or with the LoRA folded in here when none is kept."""
    if build.converter == "llama.cpp":
        return pinned_tasks(build)
    model, paths = build.model, build.paths
    sources = [(paths.base_name, paths.base, paths.base_files(), None)]
    if build.keeps_merged_hf:
        sources.append((build.release, paths.merged, [paths.merged / INDEX], None))
    elif paths.adapter:
        sources.append((build.release, paths.base, paths.adapter_files() + paths.base_files(), paths.adapter))
    found = []
    for stem, folder, folder_files, adapter_dir in sources:
        out = gguf_of(paths, stem, model.outtype.upper())
        if build.converter == "command":  # the spec's own converter; its script is an input like the weights
            spec_dir = build.spec.source.parent if build.spec.source else Path.cwd()
            found.append(Task(
                stem, f"Hugging Face → GGUF {model.outtype} (external converter)", run_external,
                {"command": model.convert.command, "model_dir": folder, "out_path": out, "outtype": model.outtype,
                 "cwd": spec_dir},
                {"command": model.convert.command, "outtype": model.outtype},
                inputs=folder_files + model.convert.input_files(spec_dir), outputs=[out]))
            continue
        params = {"outtype": model.outtype, "pretokenizer": model.pretokenizer}
        if stem == build.release and build.training_template:  # the release carries the format it was trained on
            params["chat_template"] = build.training_template
        merging = {"adapter_dir": adapter_dir, "allow_pickle": build.adapter_options.allow_pickle} if adapter_dir else {}
        # An imported GGUF's own pre-tokenizer name goes back into its GGUFs: a fact of the base, an input
        # already, so not a parameter.
        kwargs = params | {"pretokenizer": model.pretokenizer or build.base_pretokenizer}
        found.append(Task(stem, f"Hugging Face → GGUF {model.outtype}" + (", LoRA merged on the way" if adapter_dir else ""),
                          run, {"model_dir": folder, "out_path": out, "name": stem, **kwargs, **merging},
                          params | {"name": stem} | ({"lora_merged": True} if adapter_dir else {}),
                          inputs=folder_files, outputs=[out]))
    return found


def pinned_tasks(build: ModelBuild) -> list[Task]:
    """The base's GGUF and, with an adapter, the merged model's, by the pinned llama.cpp converter; a
    vision model's projector (mmproj) once, from the base. Its merged model is always kept as a Hugging
    Face folder: the pinned converter reads only those."""
    model, paths = build.model, build.paths
    if model.pretokenizer:
        raise BuildError(f"model {model.name}: pretokenizer = {model.pretokenizer!r} is for modelmake's own converter; "
                         "llama.cpp's converter identifies the pre-tokenizer itself (its preflight says if it cannot)")
    sources = [(paths.base_name, paths.base, paths.base_files())]
    if paths.adapter:
        sources.append((build.release, paths.merged, [paths.merged / INDEX]))
    found = [Task(stem, f"Hugging Face → GGUF {model.outtype} (llama.cpp's converter)", run_pinned,
                  {"model_dir": folder, "out_path": gguf_of(paths, stem, model.outtype.upper()),
                   "outtype": model.outtype, "name": stem},
                  {"outtype": model.outtype, "name": stem, "engine": "llama.cpp"},
                  inputs=folder_files, outputs=[gguf_of(paths, stem, model.outtype.upper())],
                  after=["tools", *build.after_preflight], versions=llamacpp.converter_versions())
             for stem, folder, folder_files in sources]
    if build.mmproj:
        found.append(Task(f"{paths.base_name}.mmproj", f"vision tower and projector → mmproj GGUF {build.mmproj_outtype} "
                          "(llama.cpp's converter)", run_pinned,
                          {"model_dir": paths.base, "out_path": build.mmproj, "outtype": build.mmproj_outtype,
                           "name": paths.base_name, "mmproj": True},
                          {"outtype": build.mmproj_outtype, "name": paths.base_name, "engine": "llama.cpp", "mmproj": True},
                          inputs=paths.base_files(), outputs=[build.mmproj], after=["tools", *build.after_preflight],
                          versions=llamacpp.converter_versions()))
    return found
