"""import: bring a base model into the cache as a Hugging Face directory.

A GGUF base (the embedded SmolLM2, or any GGUF path) is dequantized by transformers'
GGUF loader into float32 safetensors plus config, tokenizer and chat template, so the
PyTorch stages can use it. A hub base is fetched at its pinned revision. Either way the
folder ends with `files.b3`, the blake3 of every file in it (b3sum's format), which is
what later stages depend on.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .build.atomic import atomic_dir
from .build.errors import BuildError
from .build.hashing import INDEX, tree_files, write_index
from .build.spec import BaseRef
from .build.task import ModelBuild, Task
from .formats import arch, ggufheader
from .formats.tokenizer import restore_pretokenizer

REVISION = 2  # bump when this code changes the bytes it writes
TOOLS = ("transformers", "gguf", "safetensors", "torch", "huggingface-hub")  # their versions shape the bytes
HUB_FILES = ["*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
             "chat_template.json", "tokenizer.model", "LICENSE*"]


def check_gguf(path: Path) -> None:
    """Open a GGUF and fail clearly if it is corrupt, truncated or of an unsupported architecture."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as err:  # gguf-py raises ValueError, struct.error, IndexError … for bad files
        raise BuildError(f"{path}: not a readable GGUF file ({type(err).__name__}: {err}); "
                         "it may be truncated or corrupt — download or rebuild it") from None
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    size = path.stat().st_size
    if end > size:
        raise BuildError(f"{path}: truncated GGUF ({size} bytes, its tensors need {end}); download or rebuild it")
    field = reader.get_field("general.architecture")
    arch.check_gguf_arch(field.contents() if field else "(none)", str(path))


def _from_gguf(path: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf(path)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    restore_pretokenizer(tokenizer, ggufheader.read(path).scalars.get("tokenizer.ggml.pre"))
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype="float32")
    # The weights are already dequantized; without these the model refuses to be saved.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


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


def tasks(build: ModelBuild) -> list[Task]:
    base, paths = build.model.base, build.paths
    if not paths.imported:  # a Hugging Face folder is read where it is
        return []
    return [Task(build.model.name, f"{base.text} → Hugging Face folder", run,
                 {"base": base, "out_dir": paths.base}, {"base": base.text},
                 inputs=[base.path] if base.kind == "gguf" else [], outputs=[paths.base],
                 targets=[paths.base / INDEX])]
