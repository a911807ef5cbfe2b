"""What the loss sees: a page of training records exactly as tokenized, the tokens that carry loss
marked, and the share of loss tokens of each source. Pure: tokens and labels in, HTML out.

Completion-only loss fails silently elsewhere (a template without generation markers trains on every
token, or a mask that hides them all trains on nothing); this page and `problem` make it visible.
"""

from __future__ import annotations

import html
from dataclasses import dataclass


@dataclass(frozen=True)
class Source:
    """One source of records (the training records, the validation records, one file of a mix)."""

    name: str  # "data/demo.jsonl (training)"
    records: int
    tokens: int  # of every record of the source, as tokenized
    loss_tokens: int  # of those, the ones that carry loss
    examples: list[tuple[str, list[tuple[str, bool]]]]  # (file:line, [(token text, carries loss)]) of the first few
    raw_text: bool = False  # raw text (continued pretraining): every token carries loss, by design

    @property
    def share(self) -> float:
        return self.loss_tokens / self.tokens if self.tokens else 0.0


def problem(source: Source, answers_only: bool) -> str | None:
    """Why training on this source would be wrong, or None: no token carries loss, or (where only the
    answers should) every token does."""
    if source.records and source.loss_tokens == 0:
        return (f"{source.name}: no token of {source.records} records carries loss: every answer is empty once "
                "tokenized; check the records' last (assistant) turns")
    if answers_only and source.records and source.loss_tokens == source.tokens:
        return (f"{source.name}: every token of {source.records} records carries loss, though only the answers "
                "should: the chat template writes nothing before the answer (no prompt, no generation header); "
                "use a template that writes the conversation before the answer, or template = \"alpaca\"")
    return None


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:70em}
.record{font-family:ui-monospace,monospace;white-space:pre-wrap;border:1px solid #ccc;padding:.6em;margin:.4em 0 1.2em;
line-height:1.7}
.t{border-right:1px dotted #bbb}.loss{background:#c8f0c8}.special{color:#888}
.nl{color:#aaa}small{color:#666}"""


def _token(text: str, loss: bool) -> str:
    special = text.startswith("<") and text.endswith(">") and len(text) > 2
    shown = html.escape(text).replace("\n", '<span class="nl">↵</span>\n')
    classes = " ".join(c for c in ("t", "loss" if loss else "", "special" if special else "") if c)
    return f'<span class="{classes}">{shown}</span>'


def render(title: str, sources: list[Source]) -> str:
    """The page: per source its counts and share of loss tokens, then its first records token by token."""
    parts = [f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             "<p>Each record as the train stage tokenizes it; token boundaries are dotted, and the tokens on a "
             '<span class="loss">green</span> ground carry loss (the model learns to write them). ↵ is a newline.</p>']
    for source in sources:
        parts.append(f"<h2>{html.escape(source.name)}</h2><p>{source.records} records, {source.tokens:,} tokens, "
                     f"{source.loss_tokens:,} of them carry loss (<b>{source.share:.1%}</b>)</p>")
        for where, tokens in source.examples:
            parts.append(f"<small>{html.escape(where)}</small><div class=\"record\">"
                         + "".join(_token(text, loss) for text, loss in tokens) + "</div>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
