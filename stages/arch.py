"""The model architectures modelmake converts, shared by every stage that must know them."""

from __future__ import annotations

from dataclasses import dataclass

import gguf

from .errors import BuildError


@dataclass(frozen=True)
class Architecture:
    hf_class: str  # `architectures[0]` in config.json
    gguf_arch: gguf.MODEL_ARCH
    # llama.cpp's llama graph expects q/k rows in its own rotary layout, so its converter
    # permutes them; NeoX-style rope models (qwen2) keep the Hugging Face layout.
    permute_qk: bool

    @property
    def gguf_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    def rotary_heads(self, hf_name: str, config: dict) -> int:
        """How many heads to permute the rows of this tensor over (0: leave it as it is)."""
        if not self.permute_qk:
            return 0
        if ".q_proj." in hf_name:
            return config["num_attention_heads"]
        if ".k_proj." in hf_name:
            return config.get("num_key_value_heads") or config["num_attention_heads"]
        return 0


def permute_rotary(rows, n_heads: int):
    """Reorder q/k rows (weights, or a LoRA B) from Hugging Face's rotary halves to llama.cpp's
    interleaved pairs. Works on numpy arrays and torch tensors alike."""
    count = rows.shape[0]
    return rows.reshape(n_heads, 2, count // n_heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


ARCHITECTURES: dict[str, Architecture] = {
    a.hf_class: a
    for a in (
        Architecture("LlamaForCausalLM", gguf.MODEL_ARCH.LLAMA, permute_qk=True),
        Architecture("MistralForCausalLM", gguf.MODEL_ARCH.LLAMA, permute_qk=True),
        Architecture("Qwen2ForCausalLM", gguf.MODEL_ARCH.QWEN2, permute_qk=False),
        # Qwen2's layout without QKV biases, with RMS norms on q and k per head, and a head_dim of its own.
        Architecture("Qwen3ForCausalLM", gguf.MODEL_ARCH.QWEN3, permute_qk=False),
    )
}

# What the import stage reads back from a GGUF base (transformers' GGUF loader), as tested.
GGUF_ARCH_NAMES = ["llama", "qwen2"]


def from_hf_config(config: dict, where: str) -> Architecture:
    names = config.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise BuildError(
        f"{where}: architecture {', '.join(names) or '(none given)'} is not supported yet; "
        f"modelmake converts {', '.join(ARCHITECTURES)}. For another, name an external converter in the "
        "model's table: [models.convert] command = [\"python3\", \"llama.cpp/convert_hf_to_gguf.py\", "
        "\"{model_dir}\", \"--outfile\", \"{out}\", \"--outtype\", \"{outtype}\"]"
    )


def check_gguf_arch(name: str, where: str) -> None:
    if name not in GGUF_ARCH_NAMES:
        raise BuildError(
            f"{where}: GGUF architecture {name!r} is not supported yet; "
            f"modelmake imports {', '.join(GGUF_ARCH_NAMES)}."
        )
