"""TensorBoard event files of a training run, written as it trains (`report_to = ["tensorboard"]`).

The train log's rows become scalars under the names Hugging Face's Trainer gives them, so a
user's TensorBoard dashboards read modelmake's runs like their others. The writer only reads the
rows: the run's key and the adapter's bytes are the same with it on or off.
"""

from __future__ import annotations

from pathlib import Path

SCALARS = {"train_loss": "train/loss", "val_loss": "eval/loss", "learning_rate": "train/learning_rate",
           "tokens_per_s": "train/tokens_per_s",
           # preference methods, under TRL's names
           "rewards_chosen": "train/rewards/chosen", "rewards_rejected": "train/rewards/rejected",
           "rewards_margin": "train/rewards/margins", "rewards_accuracy": "train/rewards/accuracies",
           "val_preference_accuracy": "eval/preference_accuracy"}


def scalars(row: dict) -> dict[str, float]:
    """A train log row's figures, by the tag TensorBoard shows them under."""
    return {tag: row[key] for key, tag in SCALARS.items() if key in row}


class EventWriter:
    """Scalars per step into `folder` (a new event file per run, as TensorBoard expects); nothing without one."""

    def __init__(self, folder: Path | None):
        self.writer = None
        if folder:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(folder))

    def write(self, row: dict) -> None:
        if self.writer:
            for tag, value in scalars(row).items():
                self.writer.add_scalar(tag, value, row["step"])

    def close(self) -> None:
        if self.writer:
            self.writer.close()
