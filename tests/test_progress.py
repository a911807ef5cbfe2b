"""Progress bars: redrawn in place on a terminal, a line every few seconds in a log."""

import io

from stages.ground import progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_in_a_log_a_bar_prints_whole_lines_at_its_start_and_end_only_when_fast():
    log = io.StringIO()
    for _ in progress.bar(range(5000), desc="train m", unit="step", file=log):
        pass
    lines = log.getvalue().splitlines(keepends=True)
    assert "\r" not in log.getvalue() and all(line.endswith("\n") for line in lines)
    assert len(lines) == 2 and lines[0].startswith("train m:   0%") and "5000/5000" in lines[1]


def test_in_a_log_a_slow_bar_prints_a_line_every_interval(monkeypatch):
    now = [0.0]
    monkeypatch.setattr("tqdm.std.time", lambda: now[0])  # tqdm reads its clock through this name
    log = io.StringIO()
    for _ in progress.bar(range(100), desc="convert m", unit="tensor", file=log):
        now[0] += 3.0  # each step takes 3 s
    lines = log.getvalue().splitlines()
    assert 25 <= len(lines) <= 40, lines  # 300 s of work: about a line per 10 s, not one per step


def test_on_a_terminal_a_bar_redraws_in_place_and_clears_itself():
    terminal = Terminal()
    for _ in progress.bar(range(3), desc="merge", unit="shard", file=terminal):
        pass
    assert "\r" in terminal.getvalue() and "\n" not in terminal.getvalue()
