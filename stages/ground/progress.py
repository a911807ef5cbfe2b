"""Progress bars that suit where they are read.

On a terminal, tqdm redraws its bar in place. In a log (CI, `doit | tee build.log`, a file) those
redraws would be thousands of carriage-return updates; there each bar prints a plain line when it
starts, at most one every LOG_INTERVAL seconds while it runs, and one when it ends.
"""

import sys
from collections.abc import Iterable
from typing import TextIO

from tqdm import tqdm

LOG_INTERVAL = 10.0  # seconds between two lines of one bar in a log


class _Lines:
    """A stream for tqdm that writes each redraw as a line of its own (and drops the blank redraws
    tqdm uses to clear a line)."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def bar(iterable: Iterable | None = None, *, desc: str, unit: str, total: int | None = None, initial: int = 0,
        disable: bool = False, file: TextIO | None = None) -> tqdm:
    """tqdm for `iterable` (or for manual .update() calls, with `total`), on `file` (stderr by default)."""
    stream = file or sys.stderr
    is_terminal = getattr(stream, "isatty", lambda: False)()
    if is_terminal:
        return tqdm(iterable, desc=desc, unit=unit, total=total, initial=initial, disable=disable, file=stream,
                    leave=False)
    return tqdm(iterable, desc=desc, unit=unit, total=total, initial=initial, disable=disable, file=_Lines(stream),
                mininterval=LOG_INTERVAL, ascii=True, ncols=80)


def quiet_library_bars(stream: TextIO | None = None) -> None:
    """In a log, turn off the bars transformers and huggingface_hub draw themselves (loading weights,
    downloads): they redraw with carriage returns, and modelmake's own bars already say where a stage is."""
    if getattr(stream or sys.stderr, "isatty", lambda: False)():
        return
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging

    disable_progress_bars()
    logging.disable_progress_bar()
