"""The model architectures modelmake converts: one class per family, registered by the
`architectures` name in config.json.

The convert stage does everything the families share (tensor names from gguf-py, the common
hyperparameters, the tokenizer, writing); a family says only what it does differently, as
llama.cpp's own converter does: rotary row order, norm offsets, extra keys, computed tensors,
and which configurations llama.cpp would run differently from transformers (refused, never
guessed).
"""

from __future__ import annotations

import math

import gguf
import numpy as np

from ..build.errors import BuildError

EXTERNAL_CONVERTER_HINT = (
    "name an external converter in the model's table: [models.convert] command = [\"python3\", "
    "\"llama.cpp/convert_hf_to_gguf.py\", \"{model_dir}\", \"--outfile\", \"{out}\", \"--outtype\", \"{outtype}\"]"
)


def rope_of(config: dict, layer_type: str = "full_attention") -> tuple[str, dict]:
    """(scaling type, parameters) for one kind of layer. transformers 5 writes `rope_parameters`
    (per layer type for Gemma 3), older configs `rope_theta` and `rope_scaling`."""
    params = dict(config.get("rope_parameters") or {})
    if layer_type in params:
        params = dict(params[layer_type])
    elif "full_attention" in params:  # per-layer-type parameters without this type
        params = {}
    rope = {"rope_theta": config.get("rope_theta", 10000.0)} | dict(config.get("rope_scaling") or {}) | params
    return rope.get("rope_type") or rope.get("type") or "default", rope


def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def permute_rotary(rows, n_heads: int):
    """Reorder q/k rows (weights, or a LoRA B) from Hugging Face's rotary halves to llama.cpp's
    interleaved pairs. Works on numpy arrays and torch tensors alike."""
    count = rows.shape[0]
    return rows.reshape(n_heads, 2, count // n_heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


class Architecture:
    """A family with llama's defaults: what Qwen2/Qwen3 and the others change is overridden below."""

    hf_classes: tuple[str, ...] = ()
    gguf_arch: gguf.MODEL_ARCH
    rope_scalings: tuple[str, ...] = ("default", "linear")
    # llama.cpp's llama graph expects q/k rows in its own rotary layout, so its converter permutes
    # them; NeoX-style rope models keep the Hugging Face layout.
    permute_qk = False
    # tokenizer.ggml.add_space_prefix for a SentencePiece vocabulary, where the family fixes it
    add_space_prefix: bool | None = None

    @property
    def gguf_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    def check(self, config: dict, where: str) -> None:
        scaling, _ = rope_of(config)
        if scaling not in self.rope_scalings:
            raise BuildError(f"{where}: rope scaling {scaling!r} is not supported yet for {self.gguf_name} "
                             f"(modelmake writes {', '.join(self.rope_scalings)}); {EXTERNAL_CONVERTER_HINT}")

    def rotary_heads(self, hf_name: str, config: dict) -> int:
        """How many heads to permute the rows of this tensor over (0: leave it as it is)."""
        if not self.permute_qk:
            return 0
        if ".q_proj." in hf_name:
            return config["num_attention_heads"]
        if ".k_proj." in hf_name:
            return config.get("num_key_value_heads") or config["num_attention_heads"]
        return 0

    def skips(self, hf_name: str, config: dict) -> bool:
        """Tensors llama.cpp does not read: a tied output (it reads token_embd) and rope caches."""
        return (hf_name == "lm_head.weight" and bool(config.get("tie_word_embeddings"))) \
            or hf_name.endswith("rotary_emb.inv_freq")

    def norm_offset(self, hf_name: str) -> float:
        """Added to a norm weight as it is written (Gemma's RMSNorm multiplies by 1 + w)."""
        return 0.0

    def rope_dimensions(self, config: dict) -> int:
        return head_dim(config)

    def add_metadata(self, writer: gguf.GGUFWriter, config: dict) -> None:
        """Keys beyond the shared ones."""

    def computed_tensors(self, config: dict) -> dict[str, np.ndarray]:
        """Tensors llama.cpp's converter computes rather than reads; it writes them first."""
        return {}


class Llama(Architecture):
    """Llama 1-3, Mistral, DeepSeek-Coder, SmolLM. Mistral's sliding window is not written: llama.cpp's
    llama graph has none, and its converter leaves it out too."""

    hf_classes = ("LlamaForCausalLM", "MistralForCausalLM")
    gguf_arch = gguf.MODEL_ARCH.LLAMA
    rope_scalings = ("default", "linear", "llama3")
    permute_qk = True

    def computed_tensors(self, config: dict) -> dict[str, np.ndarray]:
        if rope_of(config)[0] != "llama3":
            return {}
        return {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight": llama3_rope_factors(config)}


def llama3_rope_factors(config: dict) -> np.ndarray:
    """Llama 3.1's per-frequency rope factors, as llama.cpp reads them from `rope_freqs.weight`:
    short wavelengths keep their frequency, long ones are divided by `factor`, and those between
    are blended by where the wavelength falls between the two bounds."""
    _, rope = rope_of(config)
    dim = head_dim(config)
    base = float(rope["rope_theta"])
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    context = rope.get("original_max_position_embeddings", 8192)
    wavelengths = 2 * np.pi * base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    blend = (context / wavelengths - low) / (high - low)
    factors = np.where(wavelengths < context / high, 1.0,
                       np.where(wavelengths > context / low, factor, 1 / ((1 - blend) / factor + blend)))
    return factors.astype(np.float32)


class Qwen2(Architecture):
    hf_classes = ("Qwen2ForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.QWEN2


class Qwen3(Architecture):
    """Qwen2's layout without QKV biases, with RMS norms on q and k per head, and a head_dim of its own."""

    hf_classes = ("Qwen3ForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.QWEN3


def periodic_layer_types(layers: int, period: int) -> list[str]:
    """Every period-th layer attends globally, the others within the sliding window."""
    return ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(layers)]


def layer_types(config: dict, default_period: int) -> list[str]:
    """Which layers attend within the sliding window: transformers 5 lists them, older configs
    give a period."""
    if config.get("layer_types"):
        return list(config["layer_types"])
    period = config.get("sliding_window_pattern") or config.get("_sliding_window_pattern") or default_period
    return periodic_layer_types(config["num_hidden_layers"], period)


class Gemma2(Architecture):
    """Gemma 2: RMS norms of 1 + w, post-attention and post-FFN norms, logit soft-capping, and a
    sliding window on every other layer. The output is always tied to the embeddings."""

    hf_classes = ("Gemma2ForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.GEMMA2
    rope_scalings = ("default",)
    add_space_prefix = False
    swa_period = 2  # llama.cpp's layer pattern for the family
    big_layer_count = 46  # llama.cpp scales queries by hidden/heads for this size (27B), else by head_dim

    def check(self, config: dict, where: str) -> None:
        super().check(config, where)
        if not config.get("tie_word_embeddings", True):
            raise BuildError(f"{where}: an untied output (tie_word_embeddings = false) is not a {self.gguf_name} "
                             f"llama.cpp can run: it always reads the output from the token embeddings; {EXTERNAL_CONVERTER_HINT}")
        layers, types = config["num_hidden_layers"], layer_types(config, self.swa_period)
        if types != periodic_layer_types(layers, self.swa_period):
            raise BuildError(f"{where}: the sliding-window layers {types} are not "
                             f"llama.cpp's {self.gguf_name} pattern (every {self.swa_period}th layer global); "
                             f"{EXTERNAL_CONVERTER_HINT}")
        scalar = config.get("query_pre_attn_scalar", head_dim(config))
        expected_scalar = config["hidden_size"] // config["num_attention_heads"] if layers == self.big_layer_count \
            else head_dim(config)
        if scalar != expected_scalar:
            raise BuildError(f"{where}: query_pre_attn_scalar {scalar} is not the {expected_scalar} llama.cpp uses "
                             f"for a {layers}-layer {self.gguf_name}, so its attention would differ; {EXTERNAL_CONVERTER_HINT}")

    def skips(self, hf_name: str, config: dict) -> bool:
        return hf_name == "lm_head.weight" or super().skips(hf_name, config)

    def norm_offset(self, hf_name: str) -> float:
        return 1.0 if hf_name.endswith("norm.weight") else 0.0

    def add_metadata(self, writer: gguf.GGUFWriter, config: dict) -> None:
        writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])
        writer.add_sliding_window(config["sliding_window"])


class Gemma3(Gemma2):
    """Gemma 3 text models: Gemma 2 with q/k norms, a global layer every sixth, local layers on
    rope base 10000 unscaled, and no attention soft-capping."""

    hf_classes = ("Gemma3ForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.GEMMA3
    rope_scalings = ("default", "linear")
    swa_period = 6
    big_layer_count = 62

    def check(self, config: dict, where: str) -> None:
        super().check(config, where)
        local = (config.get("rope_parameters") or {}).get("sliding_attention")
        local_scaling, local_base = (local.get("rope_type", "default"), local.get("rope_theta")) if local \
            else ("default", config.get("rope_local_base_freq", 10000.0))  # older configs: scaling is global-only
        if local_scaling != "default" or local_base != 10000.0:
            raise BuildError(f"{where}: llama.cpp runs gemma3's sliding-window layers with rope base 10000 and no "
                             f"scaling, this model has {local_base} and {local_scaling!r}; {EXTERNAL_CONVERTER_HINT}")
        if config.get("attn_logit_softcapping") is not None:
            raise BuildError(f"{where}: gemma3 in llama.cpp has no attention soft-capping; {EXTERNAL_CONVERTER_HINT}")

    def add_metadata(self, writer: gguf.GGUFWriter, config: dict) -> None:
        if config.get("final_logit_softcapping"):
            writer.add_final_logit_softcapping(config["final_logit_softcapping"])
        writer.add_sliding_window(config["sliding_window"])


class Phi3(Architecture):
    """Phi-3 / Phi-3.5 / Phi-4-mini: fused qkv and gate_up projections, partial rotary dimensions,
    the sliding window (0: none; written, though llama.cpp ignores it), and LongRoPE's long/short
    factors for 128k models."""

    hf_classes = ("Phi3ForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.PHI3
    rope_scalings = ("default", "longrope", "su")

    def rope_dimensions(self, config: dict) -> int:
        _, rope = rope_of(config)
        fraction = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
        return int(fraction * config["hidden_size"]) // config["num_attention_heads"]

    def original_context(self, config: dict) -> int:
        _, rope = rope_of(config)
        return rope.get("original_max_position_embeddings") or config.get("original_max_position_embeddings") \
            or config["max_position_embeddings"]

    def add_metadata(self, writer: gguf.GGUFWriter, config: dict) -> None:
        original = self.original_context(config)
        writer.add_rope_scaling_orig_ctx_len(original)
        window = config.get("sliding_window") or 0
        writer.add_sliding_window(window)
        if window:
            print(f"note: llama.cpp runs phi3 with full attention (its sliding window is disabled, llama.cpp#13676), "
                  f"so beyond {window} tokens its outputs differ from transformers'")
        scaling, _ = rope_of(config)
        if scaling != "default":
            scale = config["max_position_embeddings"] / original
            writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)

    def computed_tensors(self, config: dict) -> dict[str, np.ndarray]:
        scaling, rope = rope_of(config)
        if scaling == "default":
            return {}
        half = self.rope_dimensions(config) // 2
        factors = {kind: np.asarray(rope.get(f"{kind}_factor") or [], dtype=np.float32) for kind in ("long", "short")}
        if any(len(values) != half for values in factors.values()):
            raise BuildError(f"rope_scaling long_factor and short_factor must each hold {half} values "
                             f"(half the rotary dimensions), not {len(factors['long'])} and {len(factors['short'])}")
        return {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight": factors["long"],
                gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight": factors["short"]}


ARCHITECTURES: dict[str, Architecture] = {
    name: family() for family in (Llama, Qwen2, Qwen3, Gemma2, Gemma3, Phi3) for name in family.hf_classes
}

# What the import stage reads back from a GGUF base (transformers' GGUF loader), as tested.
GGUF_ARCH_NAMES = ["llama", "qwen2"]


def from_hf_config(config: dict, where: str) -> Architecture:
    names = config.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            architecture = ARCHITECTURES[name]
            architecture.check(config, where)
            return architecture
    raise BuildError(
        f"{where}: architecture {', '.join(names) or '(none given)'} is not supported yet; "
        f"modelmake converts {', '.join(ARCHITECTURES)}. For another, {EXTERNAL_CONVERTER_HINT}"
    )


def check_gguf_arch(name: str, where: str) -> None:
    if name not in GGUF_ARCH_NAMES:
        raise BuildError(
            f"{where}: GGUF architecture {name!r} is not supported yet; "
            f"modelmake imports {', '.join(GGUF_ARCH_NAMES)}."
        )
