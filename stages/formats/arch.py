"""The model architectures modelmake converts: one class per family, registered by the
`architectures` name in config.json.

The convert stage does everything the families share (tensor names from gguf-py, the common
hyperparameters, the tokenizer, writing); a family says only what it does differently, as
llama.cpp's own converter does: rotary row order, norm offsets, extra keys, computed tensors,
and which configurations llama.cpp would run differently from transformers (refused, never
guessed). `hf_config` goes the other way, for the import stage: the config.json a GGUF's
hyperparameters stand for.
"""

from __future__ import annotations

import math

import gguf
import numpy as np

from ..ground.errors import BuildError

EXTERNAL_CONVERTER_HINT = (
    "set [models.convert] engine = \"llama.cpp\" in the model's table to convert it with llama.cpp's own "
    "converter from the pinned source, or name your own: command = [\"python3\", "
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


def unpermute_rotary(rows, n_heads: int):
    """The inverse of `permute_rotary`: llama.cpp's interleaved pairs back to rotary halves."""
    count = rows.shape[0]
    return rows.reshape(n_heads, count // n_heads // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


class Architecture:
    """A family with llama's defaults: what Qwen2/Qwen3 and the others change is overridden below."""

    hf_classes: tuple[str, ...] = ()
    hf_model_type: str  # transformers' name for the config class the import stage writes
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

    def hf_config(self, meta: dict, shapes: dict[str, tuple[int, ...]], computed: dict[str, np.ndarray]) -> dict:
        """The config.json a GGUF's hyperparameters stand for: the inverse of what convert writes.

        `meta` holds the GGUF's `<arch>.` keys without that prefix, `shapes` every tensor's shape in
        Hugging Face's order, `computed` the values of the tensors `computed_tensors` writes. A key
        this does not read is caught afterwards: the import stage converts the config back and
        compares it with the GGUF, key by key."""
        n_head = meta["attention.head_count"]
        config = {
            "architectures": [self.hf_classes[0]], "model_type": self.hf_model_type,
            "hidden_size": meta["embedding_length"], "num_hidden_layers": meta["block_count"],
            "intermediate_size": meta["feed_forward_length"], "num_attention_heads": n_head,
            "num_key_value_heads": meta.get("attention.head_count_kv", n_head),
            "max_position_embeddings": meta["context_length"],
            "rms_norm_eps": meta["attention.layer_norm_rms_epsilon"],
            "vocab_size": meta.get("vocab_size") or shapes["token_embd.weight"][0],
            "tie_word_embeddings": "output.weight" not in shapes,
            "rope_parameters": self.rope_from_gguf(meta),
        }
        if "attention.key_length" in meta:  # else transformers derives hidden_size / heads, as llama.cpp does
            config["head_dim"] = meta["attention.key_length"]
        return config

    def rope_from_gguf(self, meta: dict) -> dict:
        rope = {"rope_type": "default", "rope_theta": meta.get("rope.freq_base", 10000.0)}
        if meta.get("rope.scaling.type") == "linear":
            rope |= {"rope_type": "linear", "factor": meta["rope.scaling.factor"]}
        return rope


def has_bias(shapes: dict, gguf_tensor: str) -> bool:
    return f"blk.0.{gguf_tensor}.bias" in shapes


class Llama(Architecture):
    """Llama 1-3, Mistral, DeepSeek-Coder, SmolLM. Mistral's sliding window is not written: llama.cpp's
    llama graph has none, and its converter leaves it out too."""

    hf_classes = ("LlamaForCausalLM", "MistralForCausalLM")
    hf_model_type = "llama"  # a Mistral GGUF is llama.cpp's llama, and imports as one: the same model
    gguf_arch = gguf.MODEL_ARCH.LLAMA
    rope_scalings = ("default", "linear", "llama3")
    permute_qk = True

    def computed_tensors(self, config: dict) -> dict[str, np.ndarray]:
        if rope_of(config)[0] != "llama3":
            return {}
        return {ROPE_FREQS: llama3_rope_factors(config)}

    def hf_config(self, meta: dict, shapes: dict, computed: dict) -> dict:
        config = super().hf_config(meta, shapes, computed)
        config |= {"attention_bias": has_bias(shapes, "attn_q"), "mlp_bias": has_bias(shapes, "ffn_up")}
        if ROPE_FREQS in computed:
            config["rope_parameters"] = llama3_rope_parameters(computed[ROPE_FREQS], config)
        return config


ROPE_FREQS = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"


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


def llama3_rope_parameters(factors: np.ndarray, config: dict) -> dict:
    """Llama 3.1's rope parameters from the factors a GGUF stores. The factors fix `factor` (the
    largest) and the two wavelength bounds, context / high and context / low, but not the context
    itself: any multiple of all three gives the same factors, so Llama 3's own low_freq_factor = 1
    is taken. The wavelengths between the bounds solve for the rest; at least two must fall there,
    and the result must give the stored factors back, else the file is refused rather than guessed."""
    dim, base = head_dim(config), float(config["rope_parameters"]["rope_theta"])
    wavelengths = 2 * np.pi * base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    factors = np.asarray(factors, dtype=np.float64)
    factor = float(factors.max())
    between = (factors > 1) & (factors < factor)
    problem = None
    if factor <= 1 or between.sum() < 2:
        problem = f"{between.sum()} of its {len(factors)} factors lie between 1 and the largest, {factor}"
    else:  # blend = (context/λ - low) / (high - low), a line in 1/λ
        blend = (1 / factors[between] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(1 / wavelengths[between], blend, 1)
        high = 1 - 1 / intercept
        rope = {"rope_type": "llama3", "rope_theta": base, "factor": factor, "low_freq_factor": 1.0,
                "high_freq_factor": round(float(high), 4), "original_max_position_embeddings": round(-slope / intercept)}
        if np.allclose(llama3_rope_factors(config | {"rope_parameters": rope}), factors, rtol=1e-5):
            return rope
        problem = "no Llama 3 rope (low_freq_factor 1) gives them"
    raise BuildError(f"{ROPE_FREQS}: these rope factors are not Llama 3's scaling ({problem}); "
                     "import the model from its Hugging Face folder instead")


class Qwen2(Architecture):
    hf_classes = ("Qwen2ForCausalLM",)
    hf_model_type = "qwen2"
    gguf_arch = gguf.MODEL_ARCH.QWEN2


class Qwen3(Architecture):
    """Qwen2's layout without QKV biases, with RMS norms on q and k per head, and a head_dim of its own."""

    hf_classes = ("Qwen3ForCausalLM",)
    hf_model_type = "qwen3"
    gguf_arch = gguf.MODEL_ARCH.QWEN3

    def hf_config(self, meta: dict, shapes: dict, computed: dict) -> dict:
        return super().hf_config(meta, shapes, computed) | {"attention_bias": has_bias(shapes, "attn_q")}


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
    hf_model_type = "gemma2"
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

    def hf_config(self, meta: dict, shapes: dict, computed: dict) -> dict:
        """What llama.cpp assumes of the family and `check` holds a config to: the layer pattern,
        the query scale of its size, and a tied output."""
        config = super().hf_config(meta, shapes, computed)
        layers, dim = config["num_hidden_layers"], config.get("head_dim") or head_dim(config)
        return config | {
            "tie_word_embeddings": True, "sliding_window": meta["attention.sliding_window"],
            "layer_types": periodic_layer_types(layers, self.swa_period),
            "query_pre_attn_scalar": config["hidden_size"] // config["num_attention_heads"]
            if layers == self.big_layer_count else dim,
        } | self.soft_caps(meta)

    def soft_caps(self, meta: dict) -> dict:
        return {"attn_logit_softcapping": meta["attn_logit_softcapping"],
                "final_logit_softcapping": meta["final_logit_softcapping"]}


class Gemma3(Gemma2):
    """Gemma 3 text models: Gemma 2 with q/k norms, a global layer every sixth, local layers on
    rope base 10000 unscaled, and no attention soft-capping."""

    hf_classes = ("Gemma3ForCausalLM",)
    hf_model_type = "gemma3_text"
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

    def soft_caps(self, meta: dict) -> dict:
        return {"attn_logit_softcapping": None, "final_logit_softcapping": meta.get("final_logit_softcapping")}

    def rope_from_gguf(self, meta: dict) -> dict:
        """The keys are the global layers'; the local ones run on llama.cpp's fixed base 10000."""
        return {"full_attention": super().rope_from_gguf(meta),
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}


class Phi3(Architecture):
    """Phi-3 / Phi-3.5 / Phi-4-mini: fused qkv and gate_up projections, partial rotary dimensions,
    the sliding window (0: none; written, though llama.cpp ignores it), and LongRoPE's long/short
    factors for 128k models."""

    hf_classes = ("Phi3ForCausalLM",)
    hf_model_type = "phi3"
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
        return {ROPE_FACTORS["long"]: factors["long"], ROPE_FACTORS["short"]: factors["short"]}

    def hf_config(self, meta: dict, shapes: dict, computed: dict) -> dict:
        config = super().hf_config(meta, shapes, computed)
        rope = config["rope_parameters"]
        rope["partial_rotary_factor"] = meta["rope.dimension_count"] * config["num_attention_heads"] / config["hidden_size"]
        if ROPE_FACTORS["long"] in computed:  # LongRoPE (128k models); the attention factor follows from the contexts
            rope |= {"rope_type": "longrope", "long_factor": computed[ROPE_FACTORS["long"]].tolist(),
                     "short_factor": computed[ROPE_FACTORS["short"]].tolist()}
        original = meta.get("rope.scaling.original_context_length", config["max_position_embeddings"])
        return config | {"original_max_position_embeddings": original,
                         "sliding_window": meta.get("attention.sliding_window") or None}


ROPE_FACTORS = {kind: gguf.TENSOR_NAMES[tensor] + ".weight" for kind, tensor in
                (("long", gguf.MODEL_TENSOR.ROPE_FACTORS_LONG), ("short", gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT))}


ARCHITECTURES: dict[str, Architecture] = {
    name: family() for family in (Llama, Qwen2, Qwen3, Gemma2, Gemma3, Phi3) for name in family.hf_classes
}

# What the import stage reads back: every family convert writes (Mistral's is llama).
FROM_GGUF: dict[str, Architecture] = {family.gguf_name: family for family in ARCHITECTURES.values()}


def has_plan(names: list[str]) -> bool:
    """Whether modelmake's own converter has a plan for a checkpoint of these `architectures`."""
    return any(name in ARCHITECTURES for name in names)


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


def from_gguf_arch(name: str, where: str) -> Architecture:
    if name not in FROM_GGUF:
        raise BuildError(
            f"{where}: GGUF architecture {name!r} is not supported yet; modelmake imports "
            f"{', '.join(sorted(FROM_GGUF))}. For another, use the model's Hugging Face folder or hub name as "
            f"the base (base = \"hf:org/name@revision\") with an external converter: {EXTERNAL_CONVERTER_HINT}"
        )
    return FROM_GGUF[name]
