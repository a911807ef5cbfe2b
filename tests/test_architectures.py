"""Every architecture llama.cpp runs: llama.cpp's own converter from the pinned source behind the
native one. Tiny random models of families modelmake has no plan for (mixtures of experts and dense
ones) go the whole way through doit; the preflight refuses what the pinned converter cannot take
before any training; the pinned converter writes the native converter's tensors."""

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from gguf import GGUFReader
from helpers import doit, finetune_workspace, leftovers, write_spec
from test_convert import llama_cpp_logits, prompt_ids, transformers_logits

from stages import convert
from stages.formats import hf
from stages.ground import llamacpp
from stages.ground.errors import BuildError

# Beyond the seven native families: four mixtures of experts (Qwen3-MoE; Mixtral; Qwen2-MoE with a
# shared expert; OLMoE) and four dense families (SmolLM3, OLMo 2, Granite, StarCoder2), with the GGUF
# architecture llama.cpp runs each as.
NEW_ARCHS = {"qwen3moe": "qwen3moe", "mixtral": "llama", "qwen2moe": "qwen2moe", "olmoe": "olmoe",
             "smollm3": "smollm3", "olmo2": "olmo2", "granite": "granite", "starcoder2": "starcoder2"}

LORA_TARGETS = {"smollm3": ["q_proj", "k_proj", "v_proj", "o_proj", "lm_head"]}

# A LoRA trained hard enough to move the logits well past rounding, so "the adapter on the base GGUF
# equals the merged GGUF" is a check that bites.
SPEC = """
[[models]]
name = "m"
base = "tiny"
outtype = "f32"
quantize = ["Q8_0", "Q4_K_M"]

[models.train]
dataset = "data.jsonl"
validation = 0.25
max_steps = 4
batch_size = 4
learning_rate = 1e-2

[models.train.lora]
r = 8
"""


def tensors(path) -> dict[str, tuple[str, np.ndarray]]:
    return {t.name: (t.tensor_type.name, np.array(t.data)) for t in GGUFReader(path).tensors}


def fields(path) -> dict:
    return {k: f.contents() for k, f in GGUFReader(path).fields.items() if not k.startswith("GGUF.")}


@pytest.mark.slow
@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_doit_ships_an_architecture_modelmake_has_no_plan_for(arch, request, tmp_path):
    """Preflight, train, GGUF LoRA, merge, convert, quantize, eval and package, all by doit; the merged
    GGUF's logits match transformers' on the merged model, and the GGUF LoRA on the base GGUF matches
    the merged GGUF (llama.cpp applies it as PEFT did)."""
    # SmolLM3's LoRA adapts its (untied) output layer too: PEFT, the preflight, llama.cpp's LoRA converter
    # and the merge all take lm_head.
    targets = LORA_TARGETS.get(arch)
    # Q8_0 alone: at the tiny models' width of 64, llama.cpp's Q4_K_M would fall back to other types anyway.
    spec = finetune_workspace(tmp_path, request.getfixturevalue(f"tiny_{arch}"),
                              SPEC.replace('quantize = ["Q8_0", "Q4_K_M"]', 'quantize = ["Q8_0"]')
                              + (f"target_modules = {json.dumps(targets)}\n" if targets else ""))
    ran = doit(spec).ran
    assert ran.index("import:m.preflight") < ran.index("train:m"), ran
    for task in ("adapter:m", "merge:m", "convert:m", "convert:m-merged", "quantize:m-merged-Q8_0",
                 "eval:m-Q8_0", "eval:m-lora", "package:m-Q8_0", "package:m-lora",
                 "manifest:m"):
        assert task in ran, task
    cache = tmp_path / "cache/m"
    preflight = json.loads((cache / "preflight.json").read_text())
    assert preflight["gguf_architecture"] == NEW_ARCHS[arch] and preflight["pre_tokenizer"] == "smollm"
    if targets:
        assert preflight["lora_targets"] == sorted(targets)
        assert "output.weight.lora_a" in tensors(cache / "gguf/m.lora.F16.gguf")

    merged, base_gguf, lora_gguf = (cache / f"gguf/{name}.gguf" for name in ("m-merged.F32", "m.F32", "m.lora.F16"))
    assert fields(lora_gguf)["general.type"] == "adapter"
    assert fields(lora_gguf)["general.architecture"] == fields(merged)["general.architecture"] == NEW_ARCHS[arch]
    ids = prompt_ids(cache / "merged")
    expected = transformers_logits(cache / "merged", ids)
    got = llama_cpp_logits(merged, ids)
    scale = np.abs(expected).max()
    print(f"{arch}: merged GGUF max |Δ| / scale = {np.abs(got - expected).max() / scale:.1e}")
    assert np.abs(got - expected).max() <= 1e-3 * scale  # the native families' f32 tolerance
    adapted = llama_cpp_logits(base_gguf, ids, lora_path=str(lora_gguf))
    unadapted = llama_cpp_logits(base_gguf, ids)
    print(f"{arch}: base+LoRA vs merged {np.abs(adapted - got).max() / scale:.1e}, "
          f"the LoRA's own effect {np.abs(unadapted - got).max() / scale:.1e}")
    assert np.abs(unadapted - got).max() > 2e-2 * scale, "the LoRA changes the logits, so the next check bites"
    assert np.abs(adapted - got).max() <= 2e-3 * scale

    for variant in ("Q8_0",):
        result = json.loads((cache / f"eval/{variant}.json").read_text())
        assert result["quality"]["kl_divergence"] < 0.05, (variant, result["quality"])
        assert (cache / f"package/{variant}/m-{variant}.oci.tar").is_file()
    manifest = {a["path"]: a for a in json.loads((cache / "manifest.json").read_text())["artifacts"]}
    version = f"llama-cpp-python {llamacpp.installed_version()} sdist"
    for path in ("gguf/m-merged.F32.gguf", "gguf/m.lora.F16.gguf"):
        assert manifest[path]["versions"]["llama.cpp converter"] == version, path
    assert "preflight.json" not in manifest, "the preflight is a check, not an artifact"
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]


@pytest.mark.parametrize("arch", ["mistral", *(pytest.param(a, marks=pytest.mark.slow) for a in ("llama", "gemma3"))])
def test_the_pinned_converter_writes_the_native_tensors(arch, request, tmp_path):
    """`engine = "llama.cpp"` on a native family: every tensor the same name, type and bytes. The
    metadata differs only where the two write different but equivalent facts. (The tiny models carry
    SmolLM2's BPE tokenizer: llama.cpp's converter reads Phi-3's and Gemma 2's vocabularies only from a
    SentencePiece tokenizer.model, and Qwen's tokenizer class makes an unknown pre-tokenizer of it.)"""
    model_dir = request.getfixturevalue(f"tiny_{arch}")
    native, pinned = tmp_path / "native.gguf", tmp_path / "pinned.gguf"
    convert.run(model_dir, native, "f16", "tiny")
    convert.run_pinned(model_dir, pinned, "f16", "tiny")
    ours, theirs = tensors(native), tensors(pinned)
    assert ours.keys() == theirs.keys()
    for name, (qtype, data) in ours.items():
        assert theirs[name][0] == qtype and np.array_equal(theirs[name][1], data), name
    ours, theirs = fields(native), fields(pinned)
    differing = {k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k)}
    # llama.cpp's converter adds general.type = "model" and a size label (e.g. "6.4M"); for Gemma 3 it
    # writes the local layers' rope base (10000, which llama.cpp otherwise assumes) and leaves out three
    # keys llama.cpp derives when absent: the rope dimension (the head size), the vocabulary size (the
    # token list's length) and add_bos_token (Gemma's tokenizer config says false; llama.cpp reads it
    # from the tokenizer model, which adds none).
    explained = {"general.type", "general.size_label"}
    if arch == "gemma3":
        explained |= {"gemma3.rope.freq_base_swa", "gemma3.rope.dimension_count", "gemma3.vocab_size",
                      "tokenizer.ggml.add_bos_token"}
    assert differing <= explained, sorted(differing - explained)
    assert theirs["general.type"] == "model"


@pytest.mark.slow
def test_the_pinned_converter_uses_only_its_own_gguf_py(tiny_llama, tmp_path, monkeypatch):
    """Another gguf package on PYTHONPATH and NO_LOCAL_GGUF set (which would make the script use the
    installed gguf) change nothing: the pinned tree's gguf-py is the one that runs."""
    fake = tmp_path / "elsewhere/gguf"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('a foreign gguf package was imported')\n")
    convert.run_pinned(tiny_llama, tmp_path / "clean.gguf", "f16", "tiny")
    monkeypatch.setenv("PYTHONPATH", str(fake.parent))
    monkeypatch.setenv("NO_LOCAL_GGUF", "1")
    convert.run_pinned(tiny_llama, tmp_path / "m.gguf", "f16", "tiny")
    assert (tmp_path / "m.gguf").read_bytes() == (tmp_path / "clean.gguf").read_bytes()
    assert os.environ["NO_LOCAL_GGUF"] == "1", "the caller's environment is left as it was"


def _tied_output_layer(model_dir):
    """The model's output layer made its embeddings, as SmolLM2, SmolLM3 and Gemma ship."""
    from safetensors.torch import load_file, save_file

    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": True}))
    weights = load_file(model_dir / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})


def _unknown_architecture(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(config | {"architectures": ["NotAModelForCausalLM"]}))


VOCABULARY = r"llama\.cpp's convert_hf_to_gguf\.py \(llama-cpp-python [0-9.]+\) could not convert m's vocabulary \(exit 1\)"
NOT_IN_THE_PINNED_LLAMA_CPP = ("the llama.cpp it pins (llama-cpp-python", "a newer modelmake pins a newer one",
                               "[models.convert] command")
PINNED = '\n[models.convert]\nengine = "llama.cpp"\n'


@pytest.mark.parametrize("arch, mutate, extra, reason, way_out", [
    ("llama", _unknown_architecture, "", VOCABULARY + ": .*Model NotAModelForCausalLM is not supported",
     NOT_IN_THE_PINNED_LLAMA_CPP),
    # The SmolLM2 tokenizer in a Qwen2 checkpoint: transformers' Qwen2 tokenizer splits it otherwise, so
    # its probe hash is in none of llama.cpp's tables (modelmake's own converter needs pretokenizer = …).
    ("qwen2", None, PINNED, VOCABULARY + ": .*BPE pre-tokenizer was not recognized", NOT_IN_THE_PINNED_LLAMA_CPP),
    # A LoRA on the output layer of a model whose output layer is its embeddings (SmolLM3): the layer
    # trains in PEFT, but no GGUF LoRA can hold it, and the merge has no weight to change.
    ("smollm3", _tied_output_layer, 'target_modules = ["q_proj", "lm_head"]\n',
     r"a LoRA on lm_head, q_proj does not fit the base \S+: lm_head\.weight does not exist in the base "
     r"\(its output layer is tied to the embeddings\)", ("Adapt other layers: [models.train.lora] target_modules",)),
])
@pytest.mark.slow
def test_preflight_refuses_before_any_training(arch, mutate, extra, reason, way_out, request, tmp_path):
    spec = finetune_workspace(tmp_path, request.getfixturevalue(f"tiny_{arch}"), SPEC + extra)
    if mutate:
        mutate(tmp_path / "tiny")
    result = doit(spec, check=False)
    assert result.returncode != 0
    assert "import:m.preflight" in result.ran and not [t for t in result.ran if not t.startswith(("import:", "tools"))]
    message = next(line for line in result.output.splitlines() if "preflight failed" in line)
    assert re.search(r"model m \(\w+\): preflight failed before any training: " + reason, message), message
    assert all(words in message for words in way_out), message
    assert "Traceback" not in result.output.replace(message, "")
    assert not (tmp_path / "cache/m/adapter").exists() and not (tmp_path / "cache/m/preflight.json").exists()
    assert leftovers(tmp_path / "cache") == []


@pytest.mark.slow
def test_the_lock_names_the_pinned_converter_version(tiny_smollm3, tmp_path):
    """The converter's version is in every fingerprint and the lock: a lock made with another
    llama-cpp-python is named by `doit check` (here the lock is edited; the bytes are the same)."""
    shutil.copytree(tiny_smollm3, tmp_path / "tiny")
    spec = write_spec(tmp_path, '[[models]]\nname = "m"\nbase = "tiny"\nquantize = ["Q8_0"]\n')
    doit(spec, "lock")
    lock = tmp_path / "models.lock"
    here = f"llama-cpp-python {llamacpp.installed_version()} sdist"
    assert here in lock.read_text()
    lock.write_text(lock.read_text().replace(here, "llama-cpp-python 0.3.0 sdist"))
    result = doit(spec, "check", check=False)
    assert f"llama.cpp converter version llama-cpp-python 0.3.0 sdist → {here}" in result.output, result.output[-2000:]


def test_lora_targets_of_a_mixture_of_experts(tmp_path):
    """Left at their default, the targets a MoE lacks (its experts are fused tensors in transformers) are
    dropped; named by the user, they are an error that says why."""
    from stages.ground.spec import TrainSpec
    from stages.training.targets import lora_targets

    attention = ["k_proj", "o_proj", "q_proj", "v_proj"]
    (tmp_path / "d.jsonl").write_text("")
    data = str(tmp_path / "d.jsonl")
    default = TrainSpec(dataset=data)
    assert lora_targets(default, attention + ["gate"], True, "base") == ["q_proj", "k_proj", "v_proj", "o_proj"]
    named = TrainSpec(dataset=data, lora={"target_modules": ["q_proj", "gate_proj"]})
    with pytest.raises(BuildError, match=r"lora.target_modules gate_proj are not in base; its linear layers are "
                                         r"k_proj, o_proj, q_proj, v_proj, gate; its experts are fused tensors"):
        lora_targets(named, attention + ["gate"], True, "base")


def test_rslora_is_refused_for_llama_cpps_lora_converter(tiny_smollm3, tmp_path):
    from helpers import make_peft_adapter

    from stages import adapter

    lora = make_peft_adapter(tmp_path / "lora", tiny_smollm3, rslora=True)
    with pytest.raises(BuildError, match=r"rsLoRA \(use_rslora\) cannot be written by llama.cpp's LoRA converter"):
        adapter.run_pinned(lora, tiny_smollm3, tmp_path / "m.lora.gguf", "f16", "m")
    assert not list(tmp_path.glob("*.gguf"))


# Vision-language models as they ship: the class the pinned converter writes the projector with, and
# the projector type llama.cpp's multimodal library runs it as.
VISION_MODELS = {"gemma3_vision": ("Gemma3ForConditionalGeneration", "gemma3"),
                 "qwen25_vl": ("Qwen2_5_VLForConditionalGeneration", "qwen2.5vl_merger")}


@pytest.mark.slow
@pytest.mark.parametrize("vision_model", VISION_MODELS)
def test_a_vision_language_model_ships_with_its_mmproj(vision_model, registry, request, tmp_path):
    """Gemma3ForConditionalGeneration (as Gemma 3 4B and larger ship) and Qwen2.5-VL: the LoRA trains on
    the language model only, the text GGUF is merged and quantized, the projector (mmproj) is converted
    once and shipped beside every release: an artifact in the manifest, the OCI artifact's projector
    layer (read back from a real registry after `doit push`), the Modelfile's second FROM; and
    llama.cpp's own multimodal tool, built from the pinned source, answers a prompt about an image with
    both files."""
    from PIL import Image

    base = request.getfixturevalue(f"tiny_{vision_model}")
    projector_class, projector_type = VISION_MODELS[vision_model]
    spec = finetune_workspace(tmp_path, base, SPEC + f'\n[package]\nregistry = "{registry.host}/{vision_model}"\n')
    ran = doit(spec).ran
    assert ran.index("import:m.preflight") < ran.index("train:m") and "convert:m.mmproj" in ran
    cache = tmp_path / "cache/m"
    assert json.loads((cache / "preflight.json").read_text())["vision_projector"] == projector_class
    adapted = json.loads((cache / "adapter/adapter_config.json").read_text())
    assert adapted["exclude_modules"], "the vision tower's q_proj, … are left alone"
    from safetensors import safe_open
    with safe_open(cache / "adapter/adapter_model.safetensors", "pt") as weights:
        names = list(weights.keys())
    assert names and not [name for name in names if hf.is_vision(name)], names

    mmproj = cache / "gguf/m.mmproj.F32.gguf"
    projector = fields(mmproj)
    assert projector["general.type"] == "mmproj" and projector["clip.projector_type"] == projector_type
    manifest = {a["path"]: a for a in json.loads((cache / "manifest.json").read_text())["artifacts"]}
    assert manifest["gguf/m.mmproj.F32.gguf"]["task"] == "convert:m.mmproj"
    assert "Vision: every release ships with the projector `gguf/m.mmproj.F32.gguf`" in \
        (tmp_path / "cache/report/REPORT.md").read_text()

    ids = prompt_ids(base)
    merged = cache / "gguf/m-merged.F32.gguf"
    expected = transformers_logits(cache / "merged", ids)
    got = llama_cpp_logits(merged, ids)
    scale = np.abs(expected).max()
    print(f"{vision_model}: merged text GGUF max |Δ| / scale = {np.abs(got - expected).max() / scale:.1e}")
    assert np.abs(got - expected).max() <= 2e-3 * scale  # the six-layer Gemma 3's tolerance among the native families
    adapted = llama_cpp_logits(cache / "gguf/m.F32.gguf", ids, lora_path=str(cache / "gguf/m.lora.F16.gguf"))
    unadapted = llama_cpp_logits(cache / "gguf/m.F32.gguf", ids)
    print(f"{vision_model}: base+LoRA vs merged {np.abs(adapted - got).max() / scale:.1e}, "
          f"the LoRA's own effect {np.abs(unadapted - got).max() / scale:.1e}")
    assert np.abs(unadapted - got).max() > 2e-2 * scale, "the LoRA changes the logits, so the next check bites"
    assert np.abs(adapted - got).max() <= 2e-3 * scale

    pushed = doit(spec, "push").output
    for variant in ("Q8_0", "Q4_K_M", "lora"):
        package = cache / f"package/{variant}"
        assert (package / mmproj.name).read_bytes() == mmproj.read_bytes()
        assert f"FROM ./{mmproj.name}\n" in (package / "Modelfile").read_text()
        ref = f"{registry.host}/{vision_model}/m:{variant}"
        assert f"{registry.host}/{vision_model}/m@sha256:" in pushed
        served = json.loads(subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
                                           capture_output=True, check=True).stdout)
        layers = {layer["mediaType"]: layer["annotations"]["org.opencontainers.image.title"] for layer in served["layers"]}
        assert layers["application/vnd.docker.ai.mmproj"] == mmproj.name

    picture = tmp_path / "picture.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(picture)
    answered = subprocess.run([str(llamacpp.find().path("llama-mtmd-cli")), "-m", str(cache / "gguf/m-merged.Q8_0.gguf"),
                               "--mmproj", str(mmproj), "--image", str(picture), "-p", "What colour is this?",
                               "-n", "8", "--temp", "0", "-t", "2"], capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL)
    log = answered.stdout + answered.stderr
    assert answered.returncode == 0, log[-2000:]
    # The prompt is text, the image, text: the image's chunk goes through the vision encoder and projector.
    assert re.search(r"encoding mtmd batch, n_chunks = 1 \(done = 1, total = 3\)", log), log[-2000:]
    # What follows is the answer: a tiny random model's words (Qwen2.5-VL's are newlines), but words.
    assert "mtmd batch encoding done" in log and answered.stdout, log[-2000:]


def test_an_adapter_finds_its_weights_under_the_checkpoints_own_names(tmp_path):
    """PEFT names a vision-language model's weights as transformers loads them
    (`model.language_model.layers.…`); the hub's checkpoint saves them as `language_model.model.layers.…`.
    The merge finds each by the name without those wrappers, and never in the vision tower."""
    import torch

    from stages.formats import lora

    q = "self_attn.q_proj.weight"
    base = {f"language_model.model.layers.0.{q}": (4, 4), f"vision_tower.vision_model.encoder.layers.0.{q}": (4, 4)}
    pair = (torch.zeros(1, 4), torch.zeros(4, 1))
    adapter = lora.Adapter({f"model.language_model.layers.0.{q}": pair}, alpha=1.0, rank=1, rslora=False, source=tmp_path)
    assert list(lora.fit(adapter, base, tmp_path).pairs) == [f"language_model.model.layers.0.{q}"]
    tower = lora.Adapter({f"model.vision_tower.encoder.layers.0.{q}": pair}, alpha=1.0, rank=1, rslora=False, source=tmp_path)
    with pytest.raises(BuildError, match=f"model.vision_tower.encoder.layers.0.{q} does not exist in the base"):
        lora.fit(tower, base, tmp_path)
