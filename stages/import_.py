"""import: bring a base model into the cache as a Hugging Face directory.

A GGUF base (the embedded SmolLM2, or a GGUF of any family convert writes) becomes the Hugging
Face model it stands for, the inverse of convert:
- config.json from its hyperparameters (the family's `hf_config`), checked by converting it back:
  every `<arch>.` key must come out as the file has it, so nothing is dropped or guessed;
- float32 safetensors, dequantized by gguf-py a few rows at a time, with convert's transforms
  undone (llama's rotary row order, Gemma's 1 + w norms), written as they are made, so memory
  holds a tensor, never the model;
- the tokenizer, rebuilt by transformers from the GGUF's vocabulary (with its chat template only
  if the file has one).
A hub base is fetched at its pinned revision. Either way the folder ends with `files.b3`, the
blake3 of every file in it (b3sum's format), which is what later stages depend on.

A base that llama.cpp's pinned converter will convert (an architecture modelmake has no plan for) is
first asked of that converter (`preflight`): does it know the architecture, does it recognise the
tokenizer's pre-tokenizer, can it write a vision model's projector, and can its LoRA converter write
an adapter on the layers the train stage will adapt. Its answer comes in seconds, before the train
stage starts, never after hours of training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np

from . import convert
from .formats import arch, ggufheader, hf, lora, tokenizer
from .ground import llamacpp
from .ground.atomic import atomic_dir, atomic_file
from .ground.errors import BuildError
from .ground.hashing import INDEX, HashingWriter, remember, tree_files, write_index
from .ground.progress import bar
from .ground.spec import BaseRef, TrainSpec
from .ground.task import ModelBuild, Task
from .training import targets

REVISION = 3  # bump when this code changes the bytes it writes
TOOLS = ("transformers", "gguf", "safetensors", "torch", "huggingface-hub", "tokenizers", "numpy")
HUB_FILES = ["*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
             "chat_template.json", "tokenizer.model", "preprocessor_config.json", "LICENSE*"]
CHUNK_BYTES = 64 << 20  # float32 output per dequantization step
COMPUTED = {arch.ROPE_FREQS, *arch.ROPE_FACTORS.values()}  # read into the config, not the weights
TOKEN_IDS = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "pad_token_id": "padding_token_id",
             "unk_token_id": "unknown_token_id"}


def open_gguf(path: Path) -> tuple[ggufheader.Mapped, arch.Architecture]:
    """A GGUF base, mapped, after failing clearly on a corrupt or truncated file, an adapter, a
    vocabulary-only file, or an architecture modelmake does not import."""
    try:
        gguf_file = ggufheader.Mapped(path)
    except (ValueError, struct.error, UnicodeDecodeError, OSError) as err:
        raise BuildError(f"{path}: not a readable GGUF file ({type(err).__name__}: {err}); "
                         "it may be truncated or corrupt — download or rebuild it") from None
    header, size = gguf_file.header, path.stat().st_size
    end = max((header.data_offset + t.offset + t.nbytes for t in header.tensors), default=0)
    try:
        if end > size:
            raise BuildError(f"{path}: truncated GGUF ({size} bytes, its tensors need {end}); download or rebuild it")
        if gguf_file.value("general.type") == "adapter":
            raise BuildError(f"{path} is a LoRA adapter (general.type = adapter), not a base model; name the base "
                             "model's GGUF as `base` (the adapter is what modelmake builds for it)")
        architecture = arch.from_gguf_arch(gguf_file.value("general.architecture", "(none)"), str(path))
        if not header.tensors:
            raise BuildError(f"{path} holds no tensors (a vocabulary-only GGUF?); name the model's full GGUF as `base`")
    except BuildError:
        gguf_file.close()
        raise
    return gguf_file, architecture


def dequantized(gguf_file: ggufheader.Mapped, tensor: ggufheader.TensorPlace, rows: slice = slice(None)) -> np.ndarray:
    """Rows of a GGUF tensor as float32 (rows × row length)."""
    from gguf import dequantize

    try:
        values = dequantize(gguf_file.rows(tensor)[rows], tensor.qtype)
    except NotImplementedError:
        raise BuildError(f"{gguf_file.path}: tensor {tensor.name} is {tensor.qtype.name}, which gguf-py cannot "
                         "dequantize; requantize the GGUF to a common type (llama-quantize … Q8_0) or import the "
                         "original") from None
    return values.astype(np.float32, copy=False)


def hf_shape(tensor: ggufheader.TensorPlace) -> tuple[int, ...]:
    return tuple(reversed(tensor.dims))  # GGUF lists dimensions innermost first


def hf_config(gguf_file: ggufheader.Mapped, architecture: arch.Architecture, where: str):
    """The transformers config a GGUF stands for."""
    from transformers import AutoConfig

    prefix = architecture.gguf_name + "."
    meta = {key[len(prefix):]: gguf_file.value(key) for key in gguf_file.keys() if key.startswith(prefix)}
    tensors = {t.name: t for t in gguf_file.header.tensors}
    computed = {name: dequantized(gguf_file, tensors[name]).reshape(-1) for name in COMPUTED & tensors.keys()}
    try:
        fields = architecture.hf_config(meta, {name: hf_shape(t) for name, t in tensors.items()}, computed)
    except KeyError as err:
        raise BuildError(f"{where}: the GGUF has no {prefix}{err.args[0]}, which a {architecture.gguf_name} needs; "
                         "rebuild it with llama.cpp's converter") from None
    # the ids the vocabulary gives, else none: a class default (Phi-3's pad 32000) may not exist here
    fields |= {name: gguf_file.value(f"tokenizer.ggml.{key}") for name, key in TOKEN_IDS.items()}
    if gguf_file.value("general.name"):  # where transformers' own GGUF loader keeps it
        fields["_model_name_or_path"] = gguf_file.value("general.name")
    config = AutoConfig.for_model(**fields, dtype="float32")
    as_dict = config.to_dict()  # what convert reads, as it would read config.json
    architecture.check(as_dict, where)
    _check_converts_back(gguf_file, as_dict, architecture, computed, where)
    return config


def _same(ours, theirs) -> bool:
    if isinstance(theirs, float) or isinstance(ours, float):
        return np.float32(ours) == np.float32(theirs)  # GGUF keeps float32
    return ours == theirs


def _check_converts_back(gguf_file: ggufheader.Mapped, config: dict, architecture: arch.Architecture, computed: dict,
                         where: str) -> None:
    """Every `<arch>.` key and computed tensor of the GGUF, as convert writes them from `config`:
    a key left over or a value that differs is a hyperparameter this import would lose."""
    import gguf

    writer = gguf.GGUFWriter(None, architecture.gguf_name)
    with contextlib.redirect_stdout(io.StringIO()):  # convert's notes are for converting
        convert.add_model_metadata(writer, config, architecture, "import", "f32")
    ours = {key: value.value for key, value in writer.kv_data[0].items()}
    prefix = architecture.gguf_name + "."
    for key in gguf_file.keys():
        if not key.startswith(prefix):
            continue
        theirs = gguf_file.value(key)
        if key not in ours:
            raise BuildError(f"{where}: {key} = {theirs!r} is a hyperparameter modelmake does not read back for "
                             f"{architecture.gguf_name}, so the imported model would differ; import the model's "
                             "Hugging Face folder instead")
        if not _same(ours[key], theirs):
            raise BuildError(f"{where}: {key} = {theirs!r} is not what a Hugging Face {architecture.hf_classes[0]} "
                             f"gives ({ours[key]!r}): transformers would run this file differently from llama.cpp; "
                             "import the model's Hugging Face folder instead")
    for name, values in architecture.computed_tensors(config).items():
        if name in computed and not np.allclose(values, computed[name], rtol=1e-6, atol=0):
            raise BuildError(f"{where}: tensor {name} is not what the config read from it gives back")


def weight_plans(config, architecture: arch.Architecture, tensors: dict, where: str) -> list[convert.TensorPlan]:
    """convert's plan for the model `config` describes (its names from an empty model, on the meta
    device), checked against the GGUF's tensors both ways."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    plans = convert.plan_tensors(shapes, config.to_dict(), architecture, "f32", where)
    for plan in plans:
        if plan.gguf_name not in tensors:
            raise BuildError(f"{where}: the GGUF has no tensor {plan.gguf_name}, which a {architecture.hf_classes[0]} "
                             f"of this configuration has ({plan.hf_name}); the file is incomplete or not a "
                             f"{architecture.gguf_name} llama.cpp's converter wrote")
        if hf_shape(tensors[plan.gguf_name]) != plan.shape:
            raise BuildError(f"{where}: tensor {plan.gguf_name} is {hf_shape(tensors[plan.gguf_name])}, but the "
                             f"hyperparameters make {plan.hf_name} {plan.shape}")
    unread = sorted(tensors.keys() - {plan.gguf_name for plan in plans} - COMPUTED)
    if unread:
        raise BuildError(f"{where}: the GGUF holds tensors a {architecture.hf_classes[0]} has no place for "
                         f"({', '.join(unread[:5])}{' …' if len(unread) > 5 else ''}); importing would drop them")
    return plans


INTACT = "download the GGUF again or use an intact copy"


def _write_tensor(out: HashingWriter, plan: convert.TensorPlan, gguf_file: ggufheader.Mapped,
                  tensor: ggufheader.TensorPlace) -> None:
    if plan.permute_heads:  # whole: its rows move between heads (q and k are small)
        values = dequantized(gguf_file, tensor).reshape(plan.shape)
        hf.refuse_non_finite(values, tensor.name, gguf_file.path, INTACT)
        out.write(np.ascontiguousarray(arch.unpermute_rotary(values, plan.permute_heads)).view(np.uint8))
        return
    rows = gguf_file.rows(tensor).shape[0]
    step = max(1, CHUNK_BYTES // (4 * tensor.dims[0]))
    for start in range(0, rows, step):
        values = dequantized(gguf_file, tensor, slice(start, start + step))
        hf.refuse_non_finite(values, tensor.name, gguf_file.path, INTACT)
        if plan.offset:  # Gemma's stored 1 + w; exact in float32 for the values norms take
            values = np.subtract(values, np.float32(plan.offset), dtype=np.float32)
        out.write(np.ascontiguousarray(values).view(np.uint8))


def write_weights(plans: list[convert.TensorPlan], gguf_file: ggufheader.Mapped, out_dir: Path) -> None:
    tensors = {t.name: t for t in gguf_file.header.tensors}
    by_name = {plan.hf_name: plan for plan in plans}
    shapes = {name: plan.shape for name, plan in by_name.items()}
    shards = hf.plan_shards(shapes, "F32")
    progress = bar(total=len(plans), desc="import", unit="tensor")
    for shard, names in shards.items():
        with open(out_dir / shard, "wb") as f:
            out = HashingWriter(f)
            out.write(hf.safetensors_header({name: shapes[name] for name in names}, "F32"))
            for name in names:
                _write_tensor(out, by_name[name], gguf_file, tensors[by_name[name].gguf_name])
                progress.update()
        remember(out_dir / shard, out.blake3.hexdigest(), out.sha256.hexdigest())
    progress.close()
    if len(shards) > 1:
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(hf.shard_index(shards, shapes, "F32"), indent=2))


def _sentencepiece_model(gguf_file: ggufheader.Mapped) -> bytes:
    """The GGUF's SentencePiece vocabulary as tokenizer.model: the pieces' scores, which llama.cpp
    merges by, are not in the tokenizer.json transformers builds, and convert needs them."""
    special = {name: gguf_file.value(f"tokenizer.ggml.{key}") for name, key in
               (("unk", "unknown_token_id"), ("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id"))}
    return tokenizer.sentencepiece_model(
        gguf_file.value("tokenizer.ggml.tokens"), gguf_file.value("tokenizer.ggml.scores"),
        gguf_file.value("tokenizer.ggml.token_type"), special, gguf_file.value("tokenizer.ggml.add_space_prefix", True))


def _add_special_tokens(hf_tokenizer, gguf_file: ggufheader.Mapped) -> None:
    """The special tokens transformers' GGUF tokenizer leaves out (it reads bos, eos, unk and pad),
    where the id names a control token (not a row of padding)."""
    import gguf

    for name in ("sep", "cls", "mask"):
        token_id = gguf_file.value(f"tokenizer.ggml.{name}_token_id")
        if token_id is not None and gguf_file.value("tokenizer.ggml.token_type")[token_id] == gguf.TokenType.CONTROL:
            setattr(hf_tokenizer, f"{name}_token", gguf_file.value("tokenizer.ggml.tokens")[token_id])


def _keep_saved_pretokenizer(tokenizer_config: Path) -> None:
    """A BPE vocabulary is split by the pre-tokenizer the GGUF names, saved in tokenizer.json. Named
    as a model's own class (transformers names Qwen2Tokenizer for a qwen3 file), it would be loaded
    with that model's split in its place, and training would see other tokens than llama.cpp; the
    generic class runs tokenizer.json as it is. (A qwen2 folder gets Qwen's split whatever it names:
    transformers ties it to the model type.)"""
    settings = json.loads(tokenizer_config.read_text(encoding="utf-8"))
    if settings.get("tokenizer_class") != "TokenizersBackend":
        settings["tokenizer_class"] = "TokenizersBackend"
        tokenizer_config.write_text(json.dumps(settings, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                                    encoding="utf-8")


def _from_gguf(path: Path, out: Path) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    gguf_file, architecture = open_gguf(path)
    with gguf_file:
        config = hf_config(gguf_file, architecture, str(path))
        plans = weight_plans(config, architecture, {t.name: t for t in gguf_file.header.tensors}, str(path))
        hf_tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        tokenizer.restore_pretokenizer(hf_tokenizer, gguf_file.value("tokenizer.ggml.pre"))
        _add_special_tokens(hf_tokenizer, gguf_file)
        hf_tokenizer.save_pretrained(out)
        if gguf_file.value("tokenizer.ggml.model") == "llama":
            (out / "tokenizer.model").write_bytes(_sentencepiece_model(gguf_file))
        else:
            _keep_saved_pretokenizer(out / "tokenizer_config.json")
        config.save_pretrained(out)
        GenerationConfig.from_model_config(config).save_pretrained(out)
        write_weights(plans, gguf_file, out)


def _from_hub(repo_id: str, revision: str, out: Path) -> None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        snapshot = Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES))
    except LocalEntryNotFoundError:
        raise BuildError(f"hf:{repo_id}@{revision} is not in the local Hugging Face cache and the hub cannot be "
                         "reached; connect, or `huggingface-cli download` it where you can") from None
    except HfHubHTTPError as err:
        raise BuildError(f"hf:{repo_id}@{revision}: the hub refused ({err}); check the name, the revision and "
                         "HF_TOKEN for gated models") from None
    if not any(snapshot.glob("*.safetensors")):
        raise BuildError(f"hf:{repo_id}@{revision} has no safetensors weights; modelmake does not load pickles")
    for source in tree_files(snapshot):
        target = out / source.relative_to(snapshot)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source.resolve(), target)  # the hub cache holds symlinks into its blob store


def run(base: BaseRef, out_dir: Path) -> None:
    with atomic_dir(out_dir) as tmp:
        if base.kind == "gguf":
            _from_gguf(base.path, tmp)
        elif base.kind == "hub":
            _from_hub(base.location, base.revision, tmp)
        else:
            raise AssertionError(f"a {base.kind} base needs no import")
        write_index(tmp)


# Asked of the pinned converter's own tables: which class writes the vision tower and projector of the
# checkpoint in sys.argv[1] (run by `llamacpp.convert` beside the `conversion` package); prints its name.
MMPROJ_PROBE = """
import sys
from pathlib import Path
from conversion import ModelBase, ModelType, get_model_architecture, get_model_class
hparams = ModelBase.load_hparams(Path(sys.argv[1]), False)
name = get_model_architecture(hparams, ModelType.MMPROJ)
try:
    get_model_class(name, mmproj=True)
except NotImplementedError:
    sys.exit(f"{name} has no vision projector converter (--mmproj) in this llama.cpp")
print(name)
"""


def stand_in_adapter(model_dir: Path, train: TrainSpec, folder: Path) -> list[str]:
    """A PEFT adapter of rank 1, all zeros, on every layer the train stage will adapt (by the names PEFT
    gives them): what the LoRA converter is asked to write before any training. Its target modules."""
    import torch
    from safetensors.torch import save_file

    layers = targets.adapted_layers(model_dir, train)
    weights = {}
    for name, (out_features, in_features) in layers.items():
        weights[f"base_model.model.{name}.lora_A.weight"] = torch.zeros(1, in_features)
        weights[f"base_model.model.{name}.lora_B.weight"] = torch.zeros(out_features, 1)
    modules = sorted({name.rsplit(".", 1)[-1] for name in layers})
    folder.mkdir()
    save_file(weights, folder / lora.WEIGHTS)
    (folder / lora.CONFIG).write_text(json.dumps(
        {"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": modules}), encoding="utf-8")
    return modules


def preflight(model_dir: Path, out_path: Path, name: str, vision: bool = False, train: TrainSpec | None = None) -> None:
    """Ask llama.cpp's pinned converter whether it can convert this base: its vocabulary alone is
    converted (architecture lookup, tokenizer and pre-tokenizer recognition: the steps that fail on an
    unsupported model); for a vision-language model, the projector's converter is looked up; for a
    model the spec trains, a stand-in adapter on the layers training will adapt goes through the same
    checks and LoRA converter (a dry run) as the real one will. The answer goes to `out_path` as JSON;
    a refusal is a BuildError naming the model, the reason and the way out."""
    model_dir = Path(model_dir).absolute()
    config = hf.read_config(model_dir)
    names = config.get("architectures") or ["(none given)"]
    way_out = ("modelmake cannot ship it through the llama.cpp it pins (llama-cpp-python "
               f"{llamacpp.installed_version()}; a newer modelmake pins a newer one), or name your own converter: "
               "[models.convert] command = [...]")
    adapted = None
    with tempfile.TemporaryDirectory(prefix="modelmake-preflight-") as work:
        vocab = Path(work) / "vocab.gguf"
        try:
            llamacpp.convert("convert_hf_to_gguf.py", [str(model_dir), "--vocab-only", "--outfile", str(vocab)],
                             f"convert {name}'s vocabulary")
            projector = llamacpp.convert("-c", [MMPROJ_PROBE, str(model_dir)], f"find {name}'s vision projector "
                                         "converter").split()[-1] if vision else None
            if train is not None:
                adapter = Path(work) / "adapter"
                adapted = stand_in_adapter(model_dir, train, adapter)
                stand_in = dataclasses.replace(lora.load(adapter), source=f"a LoRA on {', '.join(adapted)}")
                lora.fit(stand_in, hf.tensor_shapes(hf.headers(model_dir)), model_dir, "")
                llamacpp.convert("convert_lora_to_gguf.py", [str(adapter), "--base", str(model_dir), "--outfile",
                                 str(Path(work) / "lora.gguf"), "--dry-run"],
                                 f"write a LoRA on {name}'s {', '.join(adapted)} layers")
        except BuildError as err:
            if adapted is not None:  # the base converts; the layers the LoRA would adapt do not
                way_out = "Adapt other layers: [models.train.lora] target_modules = [...]"
            raise BuildError(f"model {name} ({', '.join(names)}): preflight failed before any training: "
                             f"{str(err).rstrip('. ')}. {way_out}") from None
        header = ggufheader.read(vocab)
    found = {"architectures": names, "gguf_architecture": header.scalars.get("general.architecture"),
             "tokenizer": header.scalars.get("tokenizer.ggml.model"),
             "pre_tokenizer": header.scalars.get("tokenizer.ggml.pre"), "vision_projector": projector,
             "lora_targets": adapted, "converter": llamacpp.converter_versions()["llama.cpp converter"]}
    with atomic_file(out_path) as tmp:
        tmp.write_text(json.dumps(found, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"llama.cpp's converter takes {name}: {', '.join(names)} → {found['gguf_architecture']}, tokenizer "
          f"{found['tokenizer']} (pre-tokenizer {found['pre_tokenizer']})"
          + (f"; its vision projector as {projector}" if projector else "")
          + (f"; a LoRA on {', '.join(adapted)}" if adapted else ""))


def preflight_tasks(build: ModelBuild) -> list[Task]:
    if build.converter != "llama.cpp":
        return []
    paths, train = build.paths, build.model.train
    # Which layers the LoRA adapts, and whether they were named (a named one the model lacks is an
    # error, a default one is dropped); nothing else of training changes the answer.
    lora_params = {"lora_targets": train.lora.target_modules,
                   "lora_named": "target_modules" in train.lora.model_fields_set} if train else {}
    return [Task(f"{paths.base_name}.preflight", "can llama.cpp's pinned converter take this base? (in seconds, "
                 "before training)", preflight,
                 {"model_dir": paths.base, "out_path": paths.preflight, "name": paths.base_name,
                  "vision": build.vision, "train": train},
                 {"vision": build.vision} | lora_params, inputs=paths.base_files(), outputs=[paths.preflight],
                 artifact=False,
                 after=["tools"], versions=llamacpp.converter_versions())]


def refuse_contexts_beyond(build: ModelBuild) -> None:
    """Context settings longer than the base was trained for, refused when the spec loads: llama.cpp
    and transformers would otherwise run past the trained positions (quietly worse numbers) or abort.
    Left at their defaults, eval's and the imatrix's windows shrink to fit instead (ModelBuild.context)."""
    model, trained = build.model, build.trained_context
    if trained is None:
        return
    settings = {"[models.eval] context": (model.eval, "context"),
                "[models.quantize] imatrix_context": (model.quantize_options, "imatrix_context"),
                "[models.package] context_size": (model.package, "context_size"),
                "[models.train] max_seq_len": (model.train, "max_seq_len")}
    for setting, (table, field) in settings.items():
        tokens = getattr(table, field) if table is not None and field in table.model_fields_set else None
        if tokens is not None and tokens > trained:
            raise BuildError(f"model {model.name!r}: {setting} = {tokens} is longer than the {trained} tokens its "
                             f"base {model.base.text} was trained on; use at most {trained}")


def tasks(build: ModelBuild) -> list[Task]:
    base, paths = build.model.base, build.paths
    refuse_contexts_beyond(build)
    if not paths.imported:  # a Hugging Face folder is read where it is
        return preflight_tasks(build)
    return [Task(paths.base_name, f"{base.text} → Hugging Face folder", run,
                 {"base": base, "out_dir": paths.base}, {"base": base.text},
                 inputs=[base.path] if base.kind == "gguf" else [], outputs=[paths.base],
                 targets=[paths.base / INDEX]), *preflight_tasks(build)]
