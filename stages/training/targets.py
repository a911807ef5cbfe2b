"""Which of a model's layers a LoRA adapts: the spec's target_modules resolved against the linear
layers the model really has. The train stage applies them; the preflight (stages.import_) asks the
same question of a model built on the meta device, so both see the same layers before any training."""

from __future__ import annotations

from pathlib import Path

from ..formats import hf
from ..ground.errors import BuildError
from ..ground.spec import TrainSpec


def linear_module_names(model) -> list[str]:
    """The last part of the name of each of the language model's linear layers (a vision tower's are no targets)."""
    import torch

    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and name and not hf.is_vision(name)})


def is_moe(model) -> bool:
    return any(name.endswith(".experts") for name, _ in model.named_modules())


def lora_targets(spec: TrainSpec, available: list[str], moe: bool, base_dir: Path) -> list[str]:
    """The spec's target_modules. Left at their default, those this model lacks are dropped: a mixture of
    experts, whose experts transformers holds as fused tensors, has no gate/up/down_proj layers, so its
    attention (and any shared expert) is adapted. Named by the user, one it lacks is an error."""
    targets = list(spec.lora.target_modules)
    if "target_modules" not in spec.lora.model_fields_set:
        targets = [m for m in targets if m in available] or targets
    unknown = [m for m in targets if m not in available]
    if unknown:
        why = ("; its experts are fused tensors in transformers, not linear layers, and llama.cpp applies LoRA "
               "to them only as one linear layer per expert: adapt the attention") if moe else ""
        raise BuildError(f"lora.target_modules {', '.join(unknown)} are not in {base_dir}; "
                         f"its linear layers are {', '.join(available)}{why}")
    return targets


def adapted_layers(base_dir: Path, spec: TrainSpec) -> dict[str, tuple[int, int]]:
    """Every linear layer the LoRA will adapt, by the name PEFT gives it, with its (out, in) features:
    the model is built on the meta device from its config, so no weight is read or allocated."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_dir)
    with torch.device("meta"):
        model = hf.language_model_class(config).from_config(config)
    targets = set(lora_targets(spec, linear_module_names(model), is_moe(model), base_dir))
    return {name: (module.out_features, module.in_features) for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets and not hf.is_vision(name)}
