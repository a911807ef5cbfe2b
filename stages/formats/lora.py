"""A PEFT LoRA adapter as modelmake reads it: (A, B) pairs keyed by the base weight they adapt.

Shared by the adapter stage (→ GGUF LoRA) and the merge stage (→ merged weights), so both
read, check and scale an adapter the same way.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..ground.errors import BuildError
from .hf import refuse_non_finite

PEFT_PREFIX = "base_model.model."
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"  # what PEFT's save_pretrained writes
ADAPTER_FILES = (WEIGHTS, CONFIG)


@dataclass
class Adapter:
    pairs: dict[str, tuple]  # base weight name ("model.layers.0.self_attn.q_proj.weight") → (A (r, in), B (out, r))
    alpha: float
    rank: int
    rslora: bool
    source: Path

    @property
    def scale(self) -> float:
        """What PEFT multiplies B·A by: alpha/r, or alpha/√r for rank-stabilized LoRA."""
        return self.alpha / math.sqrt(self.rank) if self.rslora else self.alpha / self.rank

    @property
    def gguf_alpha(self) -> float:
        """The alpha to write for llama.cpp, which always scales by alpha/r."""
        return self.scale * self.rank


def base_weight_name(peft_key: str) -> tuple[str, str] | None:
    """'base_model.model.X.lora_A.weight' → ('X.weight', 'A'); None for anything else."""
    for side in ("A", "B"):
        suffix = f".lora_{side}.weight"
        if peft_key.startswith(PEFT_PREFIX) and peft_key.endswith(suffix):
            return peft_key[len(PEFT_PREFIX): -len(suffix)] + ".weight", side
    return None


def _read_adapter_config(folder: Path) -> dict:
    path = folder / CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BuildError(f"{path} not found: a PEFT adapter folder holds {CONFIG} and {WEIGHTS}") from None
    except json.JSONDecodeError as err:
        raise BuildError(f"{path}: not valid JSON ({err})") from None
    unsupported = [
        what for what, present in (
            ("DoRA (use_dora)", config.get("use_dora")),
            ("per-module ranks or alphas (rank_pattern, alpha_pattern)", config.get("rank_pattern") or config.get("alpha_pattern")),
            ("fan_in_fan_out weights", config.get("fan_in_fan_out")),
            ("LoRA biases (lora_bias)", config.get("lora_bias")),
            ("fully trained modules (modules_to_save)", config.get("modules_to_save")),
        ) if present
    ]
    if config.get("peft_type", "LORA") != "LORA":
        unsupported.append(f"peft_type {config.get('peft_type')}")
    if unsupported:
        raise BuildError(f"{path}: {', '.join(unsupported)} cannot be written as a llama.cpp LoRA; "
                         "retrain without them")
    return config


def _load_tensors(folder: Path, allow_pickle: bool) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    safe, pickled = folder / WEIGHTS, folder / "adapter_model.bin"
    if safe.is_file():
        from .hf import read_header

        read_header(safe)
        try:
            return load_file(safe)
        except SafetensorError as err:
            raise BuildError(f"{safe}: not a valid safetensors file ({err})") from None
    if pickled.is_file():
        if not allow_pickle:
            raise BuildError(f"{folder} holds only adapter_model.bin, a pickle that can run code when loaded; "
                             "re-save it as safetensors, or set allow_pickle = true in the model's adapter table "
                             "if you trust where it came from")
        import torch

        return torch.load(pickled, map_location="cpu", weights_only=True)
    raise BuildError(f"{folder}: no {WEIGHTS}")


def load(folder: Path, allow_pickle: bool = False) -> Adapter:
    folder = Path(folder)
    config = _read_adapter_config(folder)
    halves: dict[str, dict] = {}
    for key, tensor in _load_tensors(folder, allow_pickle).items():
        refuse_non_finite(tensor, key, folder, "a training run whose loss blew up writes such an adapter: "
                          "train it again with a lower learning rate")
        parsed = base_weight_name(key)
        if parsed is None:
            raise BuildError(f"{folder}: tensor {key!r} is not a LoRA A or B matrix; only plain LoRA adapters are supported")
        name, side = parsed
        halves.setdefault(name, {})[side] = tensor
    lonely = sorted(name for name, pair in halves.items() if len(pair) != 2)
    if lonely or not halves:
        raise BuildError(f"{folder}: {'no LoRA tensors' if not halves else 'unpaired LoRA matrices: ' + ', '.join(lonely[:3])}")
    pairs = {name: (pair["A"], pair["B"]) for name, pair in sorted(halves.items())}
    ranks = {a.shape[0] for a, _ in pairs.values()}
    if ranks != {config.get("r")} or any(b.shape[1] != a.shape[0] for a, b in pairs.values()):
        raise BuildError(f"{folder}: LoRA matrices have ranks {sorted(ranks)} but adapter_config.json says r = {config.get('r')}")
    return Adapter(pairs=pairs, alpha=float(config["lora_alpha"]), rank=int(config["r"]),
                   rslora=bool(config.get("use_rslora")), source=folder)


def bare_name(name: str) -> str:
    """A weight's name without the wrappers around a language model, which transformers and the hub's
    checkpoints nest in different orders: a vision-language model's LoRA names
    `model.language_model.layers.0…` (as loaded) the weight its checkpoint saves as
    `language_model.model.layers.0…`. A vision tower's names keep their own words, so they never meet."""
    return ".".join(part for part in name.split(".") if part not in ("model", "language_model"))


def fit(adapter: Adapter, base_shapes: dict[str, tuple[int, ...]], base_dir: Path,
        way_out: str = "Was it trained on another model?") -> Adapter:
    """The adapter keyed by the base checkpoint's own weight names (the name PEFT gives, or the one
    weight whose bare name it shares); an adapter made for another base is refused before anything
    is written."""
    by_bare: dict[str, list[str]] = {}
    for name in base_shapes:
        by_bare.setdefault(bare_name(name), []).append(name)
    pairs, problems = {}, []
    for name, (a, b) in adapter.pairs.items():
        candidates = [name] if name in base_shapes else by_bare.get(bare_name(name), [])
        if len(candidates) != 1:
            tied = bare_name(name) == "lm_head.weight"  # the output layer reuses the embeddings' weight
            problems.append(f"{name} does not exist in the base" + (" (its output layer is tied to the embeddings)"
                                                                    if tied else "") if not candidates else
                            f"{name} could be any of {', '.join(candidates)} in the base")
        elif (b.shape[0], a.shape[1]) != tuple(base_shapes[candidates[0]]):
            problems.append(f"{name} is {tuple(base_shapes[candidates[0]])} in the base but the adapter changes a "
                            f"{(b.shape[0], a.shape[1])} matrix")
        else:
            pairs[candidates[0]] = (a, b)
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise BuildError(f"{adapter.source} does not fit the base {base_dir}: {shown}. {way_out}")
    return Adapter(pairs=dict(sorted(pairs.items())), alpha=adapter.alpha, rank=adapter.rank, rslora=adapter.rslora,
                   source=adapter.source)
