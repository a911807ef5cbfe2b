"""The figures of an eval result (cache/<model>/eval/<variant>.json) by name: what `doit compare`
shows, what [models.select] chooses on and what models.lock records to say how they moved."""

from __future__ import annotations

# name → (where in an eval result, what it is)
FIGURES = {
    "perplexity": (("quality", "perplexity"), "perplexity on the held-out text"),
    "kl": (("quality", "kl_divergence"), "KL divergence from the F16/F32 yardstick"),
    "top1": (("quality", "top1_agreement"), "top-1 agreement with the yardstick"),
    "exact_match": (("accuracy", "exact_match"), "answers equal to the reference answers"),
    "chrf": (("accuracy", "chrf"), "chrF of the answers"),
    "bleu": (("accuracy", "bleu"), "BLEU of the answers"),
    "preference_accuracy": (("preference", "accuracy"), "held-out preference pairs whose chosen answer it finds likelier"),
    "size_mb": (("size_bytes",), "file size, MB"),
    "prompt_tps": (("speed", "prompt_tokens_per_s"), "prompt tokens per second"),
    "gen_tps": (("speed", "gen_tokens_per_s"), "generated tokens per second"),
}
# What the same build always measures the same (speeds do not): what a lock records and a selection uses.
STABLE = ("perplexity", "kl", "top1", "exact_match", "chrf", "bleu", "preference_accuracy", "size_mb")


def figure(result: dict, name: str):
    """One figure of an eval result, or None where the result has none (no answers, no reference)."""
    where, _ = FIGURES[name]
    value = result
    for part in where:
        value = value.get(part) if isinstance(value, dict) else None
    if name == "size_mb" and value is not None:
        value = round(value / 1e6, 2)
    return value


def stable_figures(result: dict) -> dict[str, float]:
    """The stable figures an eval result has, to six significant digits (float sums of another
    thread count differ in the last ones)."""
    found = {}
    for name in STABLE:
        value = figure(result, name)
        if isinstance(value, (int, float)):
            found[name] = float(f"{value:.6g}")
    return found
