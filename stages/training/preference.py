"""Preference tuning's losses, as TRL computes them (tests/test_preference.py holds them to TRL's own).

A batch is TRL's layout: the pairs' chosen rows, then their rejected rows, right-padded, with the
answer tokens' labels and every other label IGNORE. A row's log-probability is the sum over its
answer tokens of log p(token | what precedes it).

- DPO (Rafailov et al. 2023; TRL's "sigmoid" loss): −log σ(β((πc − rc) − (πr − rr))), where π are
  the trained model's log-probabilities and r the reference's, the model as the run started.
- ORPO (Hong et al. 2024): the chosen rows' mean token NLL (prompt and answer, as ORPO's authors and
  TRL compute it) − λ·log σ(log odds(chosen) − log odds(rejected)), the odds of each answer from its
  mean token log-probability. No reference model.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE = -100


@dataclass
class Scored:
    """One batch's loss, what TRL logs beside it (per pair: rewards/chosen, rewards/rejected), and per
    pair whether the model prefers the chosen answer: the higher mean token log-probability (the mean,
    so that a shorter answer does not win by its length alone)."""

    loss: object  # a 0-d tensor, with the graph for backward
    chosen_rewards: object  # 1-d tensors, detached
    rejected_rewards: object
    prefers_chosen: object  # 1-d bool tensor

    def metrics(self) -> dict[str, float]:
        """The batch's means, as train log keys for TRL's rewards/chosen, …/rejected, …/margins, …/accuracies."""
        margins = self.chosen_rewards - self.rejected_rewards
        return {"rewards_chosen": float(self.chosen_rewards.mean()), "rewards_rejected": float(self.rejected_rewards.mean()),
                "rewards_margin": float(margins.mean()), "rewards_accuracy": float((margins > 0).float().mean())}


def normalizers(logits):
    """log Σ exp(logit) over the vocabulary at each position that predicts a next token."""
    import torch

    return torch.logsumexp(logits[:, :-1].float(), dim=-1)


def token_logps(logits, labels, normalizer=None):
    """log p of each next token (labels shifted by one), 0 where the label is IGNORE; and the mask.
    log p is the token's logit minus `normalizers`, never a whole log-softmax: at a 49,152-token
    vocabulary that would be one more float32 copy of the logits, kept for backward (and time to make)."""
    import torch

    labels = labels[:, 1:]
    mask = labels != IGNORE
    if normalizer is None:
        normalizer = normalizers(logits)
    picked = torch.gather(logits[:, :-1], 2, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1).float()
    return (picked - normalizer) * mask, mask


def sequence_logps(logits, labels, normalizer=None):
    """Each row's answer log-probability: the sum over its answer tokens; and its mean over them."""
    picked, mask = token_logps(logits, labels, normalizer)
    total = picked.sum(dim=1)
    return total, total / mask.sum(dim=1)


def _prefers(mean_logps, pairs: int):
    return (mean_logps[:pairs] > mean_logps[pairs:]).detach()


def dpo(logits, labels, reference_logps, beta: float) -> Scored:
    """DPO on a [chosen; rejected] batch; `reference_logps`: the reference's sequence_logps of the same rows."""
    import torch.nn.functional as F

    pairs = logits.shape[0] // 2
    logps, mean_logps = sequence_logps(logits, labels)
    chosen = logps[:pairs] - reference_logps[:pairs]
    rejected = logps[pairs:] - reference_logps[pairs:]
    loss = -F.logsigmoid(beta * (chosen - rejected)).mean()
    return Scored(loss, beta * chosen.detach(), beta * rejected.detach(), _prefers(mean_logps, pairs))


def _log1mexp(x):
    """log(1 − exp(x)) for x < 0, stable on both sides of −ln 2 (TRL's, after Mächler 2012)."""
    import torch

    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo(logits, labels, input_ids, attention_mask, beta: float) -> Scored:
    """ORPO on a [chosen; rejected] batch: the NLL of the chosen rows' every token, minus λ times the
    log-sigmoid of the log odds ratio of the answers' mean token probabilities."""
    import torch
    import torch.nn.functional as F

    pairs = logits.shape[0] // 2
    normalizer = normalizers(logits)  # once, for both the NLL's tokens and the answers'
    everything = input_ids[:pairs].masked_fill(attention_mask[:pairs] == 0, IGNORE)
    picked, mask = token_logps(logits[:pairs], everything, normalizer[:pairs])
    nll = -picked.sum() / mask.sum()
    _, mean_logps = sequence_logps(logits, labels, normalizer)
    chosen, rejected = mean_logps[:pairs], mean_logps[pairs:]
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    loss = nll - beta * F.logsigmoid(log_odds).mean()
    return Scored(loss, beta * chosen.detach(), beta * rejected.detach(), _prefers(mean_logps, pairs))
