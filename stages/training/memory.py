"""How much memory a LoRA run needs, from the model's config alone, before anything is loaded.

The parts are the frozen weights, what LoRA trains (weights, gradients, optimizer state), the
activations backward needs (all of them, or only each layer's input with gradient checkpointing)
and the logits the loss is taken over. Counts come from a model built on PyTorch's meta device
(shapes, no storage), so every family is counted by its own code. The figures are estimates; the
train log records the measured peak beside them.
"""

from __future__ import annotations

import os
from dataclasses import astuple, dataclass
from pathlib import Path

from ..formats import hf

GiB = 2**30
CPU_RUNTIME = 900 * 2**20  # Python, torch, transformers and the tokenizer in a CPU process (measured)
NF4_BYTES = 0.5 + 4 / 64 / 4  # 4-bit weights; double quantization stores about 0.125 bits of scales per weight


@dataclass(frozen=True)
class Shape:
    """What the estimate reads of a model: its parameter counts and activation widths."""

    params: int  # every parameter of the base
    linear_params: int  # those in the linear layers qlora would store in 4 bits
    lora_params: int  # what the LoRA adapter adds and trains
    layers: int
    hidden: int
    intermediate: int
    kv_width: int  # heads × head_dim of k (and of v)
    vocab: int


@dataclass(frozen=True)
class Estimate:
    weights: int
    training_state: int  # LoRA weights, gradients and optimizer state
    activations: int
    logits: int
    runtime: int  # the process itself (CPU) or nothing (GPU: allocator figures exclude the context)

    @property
    def total(self) -> int:
        return self.weights + self.training_state + self.activations + self.logits + self.runtime


def estimate(shape: Shape, *, weight_bytes: int, batch: int, seq_len: int, checkpointing: bool,
             qlora: bool = False, optimizer: str = "adamw", processes: int = 1, sharded: bool = False,
             cpu: bool = True) -> Estimate:
    """Bytes one run needs: of one device's memory, or of the machine's RAM for `processes` on CPU.
    `sharded` (FSDP): each process holds 1/processes of the weights, LoRA and optimizer state."""
    if processes > 1:  # each process takes its share of every batch
        batch = -(-batch // processes)
    tokens = batch * seq_len
    activation_bytes = weight_bytes
    if qlora:
        # PEFT's prepare_model_for_kbit_training makes every parameter not stored in 4 bits float32
        # (embeddings, norms, lm_head), and so the residual stream they feed: measured on an H200,
        # a Llama-7B shape peaked at 16.2 GB where bf16 counts for both gave 12.1 (BENCHMARKS.md).
        weights = int(shape.linear_params * NF4_BYTES + (shape.params - shape.linear_params) * 4)
        activation_bytes = 4
    else:
        weights = shape.params * weight_bytes
    state_bytes = {"adamw": 8, "adamw_8bit": 2, "sgd": 0}[optimizer]  # per trained parameter, in float32 or 8 bits
    training_state = shape.lora_params * (2 * weight_bytes + state_bytes)
    # What a decoder layer keeps for backward, per token: the norms' inputs, float32 copies and
    # outputs, q, k, v and their rotated copies, the attention output, and the gated MLP's
    # intermediate tensors. Calibrated on SmolLM2-135M against the measured peak (BENCHMARKS.md).
    per_layer = tokens * (12 * shape.hidden + 4 * shape.kv_width + 6 * shape.intermediate) * activation_bytes
    layer_input = tokens * shape.hidden * activation_bytes
    activations = shape.layers * layer_input + per_layer if checkpointing else shape.layers * per_layer
    # The logits in the model's dtype, their float32 copy for the loss, and that copy's gradient.
    logits = tokens * shape.vocab * (weight_bytes + 8)
    if sharded:
        weights, training_state = weights // processes, training_state // processes
    per_process = Estimate(weights, training_state, activations, logits, CPU_RUNTIME if cpu else 0)
    if not cpu or processes == 1:
        return per_process
    return Estimate(*(processes * part for part in astuple(per_process)))  # CPU processes share one RAM


def shape_of(config, target_modules: list[str], r: int) -> Shape:
    """Count a config's parameters on the meta device: no weights are read or allocated."""
    import torch

    with torch.device("meta"):
        model = hf.language_model_class(config).from_config(config)
    params = sum(p.numel() for p in model.parameters())
    linear = lora = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            if name != "lm_head":
                linear += module.weight.numel()
            if name.rsplit(".", 1)[-1] in target_modules:
                lora += r * (module.in_features + module.out_features)
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return Shape(params, linear, lora, text.num_hidden_layers, text.hidden_size, text.intermediate_size,
                 kv_heads * head_dim, text.vocab_size)


def available(device: str) -> tuple[int, str]:
    """Free memory on the device, and how it was measured (for the message)."""
    import torch

    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free, f"free on {torch.cuda.get_device_name()}"
    if device == "mps":
        return torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory(), "MPS's recommended limit"
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():  # Linux
        fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines())
        return int(fields["MemAvailable"].split()[0]) * 1024, "available RAM (/proc/meminfo)"
    # macOS and other Unixes name no free figure that means "can be had"; the installed RAM bounds it.
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "of installed RAM"


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def describe(e: Estimate) -> str:
    return (f"{_gib(e.total)} (weights {_gib(e.weights)}, LoRA + optimizer {_gib(e.training_state)}, "
            f"activations {_gib(e.activations)}, logits {_gib(e.logits)})")


def too_big(needed: Estimate, limit: int, where: str, options: dict[str, Estimate]) -> str:
    """The paragraph a run that would not fit fails with: the estimate, the limit, and what would fit."""
    fits = [f"{change} (≈ {_gib(e.total)})" for change, e in options.items() if e.total <= limit]
    advice = ("These would fit: " + "; ".join(fits) + ".") if fits else \
        "None of the memory options would fit: use a machine with more memory."
    return (f"training would need about {describe(needed)}, more than the {_gib(limit)} {where}. {advice} "
            "(Set max_memory in [models.train] to state what the run may use.)")

