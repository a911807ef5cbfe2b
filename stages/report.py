"""report: one page per spec that answers, with measured numbers, what the build made.

    cache/report/REPORT.md      the page, for a repository or a terminal
    cache/report/report.html    the same, self-contained (images inline), for a browser offline
    cache/report/<model>.loss.png, graph.png (the task graph drawn, for the HTML page)

Per model: a table of GGUF variants × (size, bits per weight, perplexity, KL and top-1 against
the reference, speed); the fine-tune before and after; the training loss curve; every artifact
with its sha256. Then the build: each task's wall time and peak memory, when it last ran, and a
Mermaid flowchart of the task graph marking what ran in the last build.

The page is built as a list of blocks, and two small writers turn it into Markdown and HTML.
"""

from __future__ import annotations

import base64
import html
import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .ground import runlog
from .ground.atomic import atomic_file
from .ground.errors import BuildError
from .ground.spec import WITHOUT_IMATRIX

# ---- blocks ----

@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class Image:
    file: str  # beside the report
    alt: str


@dataclass(frozen=True)
class Mermaid:
    source: str
    picture: str | None = None  # the same graph drawn as a PNG beside the report, shown by the HTML page


Block = Heading | Text | Table | Image | Mermaid


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: list[Block]) -> str:
    out = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Text):
            out.append(block.text)
        elif isinstance(block, Table):
            out.append("\n".join(["| " + " | ".join(map(_md_cell, block.header)) + " |",
                                  "|" + "---|" * len(block.header)]
                                 + ["| " + " | ".join(map(_md_cell, row)) + " |" for row in block.rows]))
        elif isinstance(block, Image):
            out.append(f"![{block.alt}]({block.file})")
        else:
            out.append(f"```mermaid\n{block.source}\n```")
    return "\n\n".join(out) + "\n"


STYLE = """body{font:15px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#1b1f24}
table{border-collapse:collapse;margin:.6em 0 1.2em}th,td{border:1px solid #c9d1d9;padding:.3em .6em;text-align:left}
th{background:#dde7f5}td{font-variant-numeric:tabular-nums}code{background:#f2f4f7;padding:0 .2em}
pre{background:#f6f8fa;padding:.8em;overflow:auto}img{max-width:100%}"""


def _inline(text: str) -> str:
    """`code` spans and [links](to files beside the report), the only Markdown the text blocks use."""
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))
    return re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r'<a href="\2">\1</a>', text)


def to_html(blocks: list[Block], images: dict[str, bytes], title: str) -> str:
    out = [f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
           f"<style>{STYLE}</style></head><body>"]
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Text):
            out.append(f"<p>{_inline(block.text)}</p>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{html.escape(c)}</th>" for c in block.header)
            body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in block.rows)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif isinstance(block, Image):
            data = base64.b64encode(images[block.file]).decode("ascii")
            out.append(f"<img alt=\"{html.escape(block.alt)}\" src=\"data:image/png;base64,{data}\">")
        else:
            if block.picture:
                data = base64.b64encode(images[block.picture]).decode("ascii")
                out.append("<div style=\"overflow-x:auto\"><img style=\"max-width:none\" alt=\"task graph\" "
                           f"src=\"data:image/png;base64,{data}\"></div>")
            out.append("<details><summary>Mermaid source (renders on GitHub, GitLab, mermaid.live)</summary>"
                       f"<pre class=\"mermaid\">{html.escape(block.source)}</pre></details>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# ---- the task graph ----

@dataclass(frozen=True)
class Node:
    task: str  # stage:name
    needs: tuple[str, ...]  # tasks whose outputs it reads, or that must run first


def graph_nodes(tasks: dict[str, list[dict]], stages: tuple[str, ...]) -> list[Node]:
    """The doit graph of `stages` (the sub-task dicts, before doit names them `stage:name`): an edge
    wherever a task's file_dep is another's target, or a task_dep; edges implied by a longer path
    are left out, so the picture shows the lifecycle, not every file read."""
    flat = [(f"{stage}:{t['name']}", t) for stage in stages for t in tasks.get(stage, [])]
    made_by = {target: name for name, t in flat for target in t.get("targets", [])}
    needs = {name: ({made_by[f] for f in t.get("file_dep", []) if f in made_by} | set(t.get("task_dep", []))) - {name}
             for name, t in flat}
    return [Node(name, tuple(sorted(transitive_reduction(needs)[name]))) for name, _ in flat]


def transitive_reduction(needs: dict[str, set[str]]) -> dict[str, set[str]]:
    """Drop a → c where c is also reached through another need of a (the graph is acyclic)."""
    reach: dict[str, set[str]] = {}

    def reachable(node: str) -> set[str]:
        if node not in reach:
            reach[node] = set()
            for need in needs.get(node, ()):
                reach[node] |= {need} | reachable(need)
        return reach[node]

    return {node: {n for n in direct if not any(n in reachable(other) for other in direct - {n})}
            for node, direct in needs.items()}


STATES = {  # a task's part in the last build → (Mermaid class, fill, stroke, text colour)
    "ran": ("ran", "#c8e6c0", "#2f7a21", "#10320a"),
    "restored": ("restored", "#cfe3f7", "#1f5f9e", "#0b2b4a"),
    "up to date": ("uptodate", "#eef0f3", "#8b949e", "#3d444d"),
}


def mermaid(nodes: list[Node], states: dict[str, str]) -> str:
    """`states`: task → its part in the last build (a key of STATES); absent is up to date."""
    ids = {node.task: f"t{i}" for i, node in enumerate(nodes)}
    lines = ["flowchart LR"]
    lines += [f"  {ids[n.task]}[\"{n.task}\"]" for n in nodes]
    lines += [f"  {ids[need]} --> {ids[n.task]}" for n in nodes for need in n.needs if need in ids]
    lines += [f"  classDef {css} fill:{fill},stroke:{stroke},color:{text}" for css, fill, stroke, text in STATES.values()]
    for state, (css, *_) in STATES.items():
        members = [n for n in nodes if states.get(n.task, "up to date") == state]
        if members:
            lines.append(f"  class {','.join(ids[n.task] for n in members)} {css}")
    return "\n".join(lines)


def _pyplot():
    """matplotlib's pyplot on its image backend (Agg), which needs no display."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def _png(fig) -> bytes:
    """The figure as PNG bytes, closed; no Software stamp, so the same figure gives the same bytes."""
    import io

    from matplotlib import pyplot

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    pyplot.close(fig)
    return buffer.getvalue()


def graph_png(nodes: list[Node], states: dict[str, str]) -> bytes:
    """The same graph as a picture, for the HTML page offline: a column per step of the longest path
    to each task, a box per task, coloured by its part in the last build (as the Mermaid graph)."""
    plt = _pyplot()

    needs = {n.task: n.needs for n in nodes}
    depth: dict[str, int] = {}

    def column(task: str) -> int:
        if task not in depth:
            depth[task] = 1 + max((column(n) for n in needs[task] if n in needs), default=-1)
        return depth[task]

    columns: dict[int, list[str]] = {}
    for node in nodes:
        columns.setdefault(column(node.task), []).append(node.task)
    place = {task: (x * 2.4, -(row - (len(tasks) - 1) / 2) * 0.62)
             for x, tasks in columns.items() for row, task in enumerate(tasks)}
    tallest = max(len(tasks) for tasks in columns.values())
    fig, ax = plt.subplots(figsize=(2.4 * len(columns) + 0.4, 0.62 * tallest + 0.6), dpi=100)
    for node in nodes:
        for need in node.needs:
            if need in place:
                ax.annotate("", xy=place[node.task], xytext=place[need],
                            arrowprops={"arrowstyle": "-|>", "color": "#8b949e", "lw": 0.8,
                                        "shrinkA": 40, "shrinkB": 40})
    for task, (x, y) in place.items():
        stage, _, name = task.partition(":")
        _, fill, edge, _ = STATES[states.get(task, "up to date")]
        ax.text(x, y, f"{stage}\n{name}", ha="center", va="center", fontsize=7,
                bbox={"boxstyle": "round,pad=0.35", "facecolor": fill, "edgecolor": edge})
    ax.set_xlim(-1.2, 2.4 * (len(columns) - 1) + 1.2)
    ax.set_ylim(-0.31 * tallest - 0.3, 0.31 * tallest + 0.3)
    ax.axis("off")
    return _png(fig)


# ---- numbers into words ----

def _mb(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:,.1f} {unit}"
    return f"{size} B"


def _num(value, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def variant_rows(results: list[dict], gates: dict[str, dict]) -> list[list[str]]:
    rows = []
    for r in results:
        q = r.get("quality") or {}
        compared = "reference_perplexity" in q
        increase = q["perplexity"] / q["reference_perplexity"] - 1 if compared else None
        rows.append([
            r["variant"], ", ".join(f"`{Path(f).name}`" for f in r["files"]), _mb(r["size_bytes"]),
            f"{r['bits_per_weight']:.2f}", _num(q.get("perplexity")), _num(q.get("answer_perplexity")),
            "—" if increase is None else f"{increase:+.2%}", _num(q.get("kl_divergence"), 5),
            "—" if not compared else f"{q['top1_agreement']:.1%}",
            *_accuracy_cells(r.get("accuracy")),
            f"{r['speed']['prompt_tokens_per_s']:,.0f}", f"{r['speed']['gen_tokens_per_s']:,.1f}",
            _gate_words(gates.get(r["variant"])),
        ])
    return rows


def _accuracy_cells(scores: dict | None) -> list[str]:
    """exact match, chrF, BLEU, same answers as the reference."""
    if not scores:
        return ["—"] * 4
    same = scores.get("same_as_reference")
    return [f"{scores['exact_match']:.0%}", f"{scores['chrf']:.1f}", f"{scores['bleu']:.1f}",
            "—" if same is None else f"{same:.0%}"]


def read_parities(root: Path, releases: list[str]) -> dict[str, dict]:
    """Each release's parity result, by variant, read once for the tables that show it."""
    return {variant: _read_json(root / "parity" / f"{variant}.json") for variant in releases}


def parity_rows(parities: dict[str, dict], by_variant: dict[str, dict]) -> list[list[str]]:
    rows = []
    for variant, parity in parities.items():
        terminated = ((by_variant.get(variant) or {}).get("accuracy") or {}).get("terminated")
        skipped = len(parity.get("skipped") or [])
        rows.append([variant, f"{parity['conversations']}" + (f", {skipped} skipped" if skipped else ""),
                     parity["llama_server"], parity["ollama"],
                     f"`{parity['end_of_turn']}`" if parity["end_of_turn"] else "—",
                     "—" if terminated is None else f"{terminated:.0%}", _served_words(parity.get("served_answers"))])
    return rows


def _served_words(served: dict | None) -> str:
    return "—" if served is None else f"identical {served['identical']}/{served['answers']}"


def parity_skipped(parities: dict[str, dict]) -> list[Block]:
    """The conversations a release's chat template cannot write as training does, with its reason."""
    rows = [[variant, row["conversation"], row["skipped"]] for variant, parity in parities.items()
            for row in parity.get("skipped") or []]
    if not rows:
        return []
    return [Text("Conversations not compared: the chat template cannot write them as training would (so the "
                 "training data held none like them either):"), Table(["release", "conversation", "why"], rows)]


def served_differences(parities: dict[str, dict]) -> list[Block]:
    """Every answer llama-server gave otherwise than the in-process eval, verbatim."""
    rows = [[variant, d["question"], d["in_process"], d["served"]] for variant, parity in parities.items()
            for d in (parity.get("served_answers") or {}).get("differences", [])]
    if not rows:
        return []
    return [Text("Answers llama-server gave otherwise than the in-process eval:"),
            Table(["release", "question", "in process", "served"], rows)]


def _gate_words(gate: dict | None) -> str:
    if not gate:
        return ""
    words = {"max_ppl_increase": "ppl ≤ +{:.1%}", "max_kl": "KL ≤ {}", "min_top1": "top-1 ≥ {:.0%}",
             "min_exact_match": "exact ≥ {:.0%}", "max_exact_match_drop": "exact drop ≤ {:.0%}",
             "min_chrf": "chrF ≥ {}", "min_terminated": "ends turn ≥ {:.0%}",
             "min_preference_accuracy": "prefers chosen ≥ {:.0%}"}
    return ", ".join(words[k].format(v) for k, v in gate.items() if v is not None)


def loss_curve_png(log: list[dict], title: str) -> bytes:
    plt = _pyplot()

    train = [(r["step"], r["train_loss"]) for r in log if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in log if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7.5, 3.6), dpi=100)
    if train:
        ax.plot(*zip(*train), label="training loss", color="#3b6fb6", linewidth=1.4)
    if val:
        ax.plot(*zip(*val), label="validation loss", color="#d1495b", marker="o", linewidth=1.4)
    ax.set(xlabel="step", ylabel="loss (nats per answer token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def loss_curves_png(logs: dict[str, list[dict]], title: str) -> bytes:
    """The validation loss of every variant of a matrix on one plot (the training loss where a
    variant has no validation split)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 3.6), dpi=100)
    for name, log in logs.items():
        points = [(r["step"], r["val_loss"]) for r in log if "val_loss" in r] or \
            [(r["step"], r["train_loss"]) for r in log if "train_loss" in r]
        if points:
            ax.plot(*zip(*points), label=name, marker="o" if len(points) < 20 else None, linewidth=1.4)
    ax.set(xlabel="step", ylabel="validation loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _png(fig)


@dataclass(frozen=True)
class Experiment:
    """One [models.matrix] as the report shows it: `doit compare`'s table, each variant's train log,
    and the choice of [models.select] (selected.json) if it has one."""

    model: str
    header: list[str]
    rows: list[list]
    logs: dict[str, list[dict]]
    selection: dict | None


def experiment_blocks(experiment: Experiment, images: dict[str, bytes]) -> list[Block]:
    blocks: list[Block] = [Heading(2, f"Experiment: {experiment.model}"),
                           Text(f"{len(experiment.rows)} variants of `[models.matrix]`, as `doit compare` shows them.")]
    blocks.append(Table(experiment.header, [[_num(v) if isinstance(v, float) else "-" if v is None else str(v)
                                             for v in row] for row in experiment.rows]))
    if experiment.selection:
        chosen = experiment.selection
        blocks.append(Text(f"Promoted: **{chosen['winner']}**, the {'highest' if chosen['maximize'] else 'lowest'} "
                           f"{chosen['metric']} of {chosen['variant']} ({_num(chosen['figures'][chosen['winner']])}); "
                           f"its releases ship as `{experiment.model}`."))
    if any(experiment.logs.values()):
        name = f"{experiment.model}-loss-curves.png"
        images[name] = loss_curves_png(experiment.logs, f"{experiment.model}: the variants' validation loss")
        blocks.append(Image(name, f"validation loss of every variant of {experiment.model}"))
    return blocks


# ---- the page ----

@dataclass(frozen=True)
class ModelInputs:
    """Where one model's results are; the graph fills this in."""

    name: str
    root: Path  # cache/<model>
    variants: list[str]  # in the order the table lists them
    train_log: Path | None
    text_source: str | None
    gates: dict[str, dict]
    releases: list[str] = field(default_factory=list)  # the packaged variants, each checked for parity
    results: dict[str, Path] = field(default_factory=dict)  # variant → its eval JSON (a matrix's base eval is shared)
    preview: Path | None = None  # the train stage's loss preview page


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BuildError(f"{path} is missing: run `doit` to build and measure, then `doit report`") from None


def speed_words(results: list[dict]) -> str:
    """What the speed columns measured; variants over 1 GiB get shorter runs unless the spec sets them."""
    groups: dict[tuple, list[str]] = {}
    for r in results:
        s = r["speed"]
        groups.setdefault((s["prompt_tokens"], s["gen_tokens"], s["runs"]), []).append(r["variant"])

    def words(prompt: int, gen: int, runs: int) -> str:
        return (f"prompt processing of {prompt} tokens and generation of {gen} tokens, "
                + (f"median of {runs} runs" if runs > 1 else "one timed run") + " after an untimed one")

    if len(groups) == 1:
        return words(*next(iter(groups)))
    return "; ".join(f"{', '.join(variants)}: {words(*settings)}" for settings, variants in groups.items()) + \
        " (a GGUF over 1 GiB gets shorter speed runs; `[models.eval] speed_prompt`, `speed_tokens` and " \
        "`speed_runs` set them for every variant)"


def model_blocks(model: ModelInputs, images: dict[str, bytes]) -> list[Block]:
    results = [_read_json(model.results[v]) for v in model.variants]
    by_variant = {r["variant"]: r for r in results}
    speed = results[0]["speed"]
    blocks: list[Block] = [Heading(2, model.name), Heading(3, "Quality and speed of every GGUF")]
    quality = next((r["quality"] for r in results if r["quality"]), None)
    if quality:
        blocks.append(Text(
            f"Held-out text: {model.text_source}: {quality.get('documents', 1)} documents, {quality['tokens']} tokens, "
            f"windows of at most {quality['context']} tokens, {quality['scored']} tokens scored"
            + (f" ({quality['answer_tokens']} of them answers)" if quality.get("answer_tokens") else "")
            + ". KL divergence and top-1 agreement are against the reference GGUF on the same tokens "
              "(llama.cpp's `--kl-divergence` measure)."))
    else:
        blocks.append(Text("No held-out text (set `[models.eval] text`): size and speed only."))
    blocks.append(Text(
        f"Speed: llama.cpp through llama-cpp-python {results[0]['versions'].get('llama-cpp-python', '?')}, "
        f"{speed['threads']} threads, {speed_words(results)}."))
    answered = next((r["accuracy"] for r in results if r.get("accuracy")), None)
    if answered:
        blocks.append(Text(
            f"Answers: {answered['prompts']} held-out prompts, each answered by greedy generation (at most "
            f"{answered['max_new_tokens']} tokens, up to the end of the turn) with the chat template; exact match "
            "after normalization (case, Unicode form and whitespace), corpus chrF and BLEU from sacrebleu, and "
            "the share of answers identical to the reference GGUF's. Every answer is in the variant's eval JSON."))
    blocks.append(Table(["variant", "GGUF", "size", "bits/weight", "perplexity", "answer ppl", "Δ ppl",
                         "KL", "top-1", "exact match", "chrF", "BLEU", "same answers", "prompt t/s", "gen t/s",
                         "gate"], variant_rows(results, model.gates)))
    paired = [r for r in results if r.get("preference")]
    if paired:
        blocks += [Text("Held-out preference pairs: how often each variant, run by llama.cpp, gives the chosen answer a "
                        "higher mean token log-probability than the rejected one, and the mean of that difference."),
                   Table(["variant", "pairs", "prefers chosen", "mean log-prob margin"],
                         [[r["variant"], str(r["preference"]["pairs"]), f"{r['preference']['accuracy']:.0%}",
                           f"{r['preference']['mean_logp_margin']:+.4f}"] for r in paired])]

    if model.releases:
        parities = read_parities(model.root, model.releases)
        blocks += [Heading(3, "Served as trained"),
                   Text("Each release's prompts, rendered as the train stage wrote them, by llama-server (llama.cpp's "
                        "Jinja engine on the chat template the release ships: what Docker Model Runner runs) and by "
                        "Ollama (the Modelfile TEMPLATE through Go's text/template), must be the same tokens; the "
                        "token training answers end with must be one llama.cpp stops at (the Modelfile's stop words "
                        "are those tokens). \"Ends its turn\": the share of greedy answers that stop by themselves "
                        "before the token limit. \"Served answers\": the eval's prompts asked again through "
                        "llama-server's `/v1/chat/completions` (greedy), against the answers generated in process."),
                   Table(["release", "conversations", "llama-server", "Ollama", "end of turn", "ends its turn",
                          "served answers"], parity_rows(parities, by_variant))]
        blocks += parity_skipped(parities) + served_differences(parities)

    compared = imatrix_rows(by_variant)
    if compared:
        blocks += [Heading(3, "What the importance matrix buys"),
                   Text("Each type quantized twice from the same GGUF: without the importance matrix (left of "
                        "each arrow) and with it (right), measured on the same held-out text and prompts. The one "
                        "without is not released (`[models.quantize] compare_without_imatrix`)."),
                   Table(["type", *IMATRIX_COMPARED, "KL change"], compared)]

    blocks += [Heading(3, "Since the previous build"),
               Text("Each variant's headline numbers against the last build that measured different ones "
                    f"(kept in `{model.name}/eval/history.jsonl`)."),
               Table(["variant", "change"], compare_with_history(model.root, results))]

    base, tuned = by_variant.get("base"), next((r for r in results if r["variant"] not in ("base", "lora")), None)
    if base and tuned and base.get("quality") and tuned.get("quality"):
        rows = [["perplexity", _num(base["quality"]["perplexity"]), _num(tuned["quality"]["perplexity"])]]
        if base["quality"].get("answer_perplexity"):
            rows.append(["answer perplexity", _num(base["quality"]["answer_perplexity"]),
                         _num(tuned["quality"]["answer_perplexity"])])
        if base.get("preference") and tuned.get("preference"):
            rows.append(["prefers the chosen answer (held-out pairs)", f"{base['preference']['accuracy']:.0%}",
                         f"{tuned['preference']['accuracy']:.0%}"])
        log = train_log(model.train_log)
        val = [r["val_loss"] for r in log if "val_loss" in r]
        if len(val) >= 2:
            rows.append(["validation loss (train stage, PyTorch)", _num(val[0]), _num(val[-1])])
        blocks += [Heading(3, "Fine-tune: before and after"),
                   Text(f"The base model's GGUF before fine-tuning against the merged {tuned['variant']} GGUF, "
                        "on the same held-out text."),
                   Table(["", "before (base)", f"after (merged {tuned['variant']})"], rows)]
        if log:
            name = f"{model.name}.loss.png"
            images[name] = loss_curve_png(log, f"{model.name}: LoRA fine-tune")
            steps = [r for r in log if "train_loss" in r]
            blocks += [Image(name, f"{model.name} training and validation loss"),
                       Text(f"{len(steps)} steps; "
                            f"median {statistics.median(r['tokens_per_s'] for r in steps):,.0f} "
                            f"tokens/s; peak memory {max(r['peak_memory_mb'] for r in steps):,.0f} MB"
                            f"{_estimated(log)}.")]
        ending = log[-1] if log else {}
        if ending.get("stopped") or "kept_step" in ending:
            blocks.append(Text((f"Stopped {ending['stopped']}. " if ending.get("stopped") else "")
                               + f"The adapter is step {ending.get('kept_step', ending['step'])}'s."))
        mix = next((r["mix"] for r in log if "mix" in r), None)
        if mix:
            taken = next((r["mix_trained"] for r in reversed(log) if "mix_trained" in r), {})
            blocks += [Text("The training mix ([[models.train.datasets]]): each source's share of an epoch, and of the "
                            "rows the steps took."),
                       Table(["source", "records in an epoch", "share", "share of the rows trained"],
                             [[name, str(n), f"{n / sum(mix.values()):.1%}",
                               f"{taken[name] / sum(taken.values()):.1%}" if taken else "— (packed rows)"]
                              for name, n in mix.items()])]
        if model.preview and model.preview.is_file():
            shown = f"{model.preview.parent.name}/{model.preview.name}"
            blocks.append(Text(f"What the loss saw: [{shown}](../{shown}), the first "
                               "records of each source as tokenized, the tokens that carry loss marked."))

    manifest = _read_json(model.root / "manifest.json")
    listed = [a for a in manifest["artifacts"] if "/oci/blobs/" not in a["path"]]
    projectors = [a["path"] for a in listed if a["task"] == f"convert:{model.name}.mmproj"]
    if projectors:  # a vision-language model: its text GGUFs above run with this beside them
        blocks.append(Text(f"Vision: every release ships with the projector `{projectors[0]}` (llama.cpp's `--mmproj`), "
                           "in its package folder, as the OCI artifact's `application/vnd.docker.ai.mmproj` layer "
                           "and as the Modelfile's second `FROM`."))
    blocks += [Heading(3, "Artifacts"),
               Text(f"From `{model.name}/manifest.json` and `{model.name}/SHA256SUMS`, which also list the OCI "
                    f"blobs (each named by its sha256); `doit verify` re-hashes them all."),
               Table(["file", "size", "sha256"], [[f"`{a['path']}`", _mb(a["size"]), f"`{a['sha256']}`"] for a in listed])]
    return blocks


# ---- build to build ----

# The headline numbers a build-to-build comparison follows: (label, how to read it off an eval
# result, how to write it).
HEADLINE = [
    ("size", lambda r: r["size_bytes"], _mb),
    ("perplexity", lambda r: (r.get("quality") or {}).get("perplexity"), lambda v: f"{v:.4f}"),
    ("answer ppl", lambda r: (r.get("quality") or {}).get("answer_perplexity"), lambda v: f"{v:.4f}"),
    ("KL", lambda r: (r.get("quality") or {}).get("kl_divergence"), lambda v: f"{v:.5f}"),
    ("top-1", lambda r: (r.get("quality") or {}).get("top1_agreement"), lambda v: f"{v:.1%}"),
    ("exact match", lambda r: (r.get("accuracy") or {}).get("exact_match"), lambda v: f"{v:.0%}"),
    ("chrF", lambda r: (r.get("accuracy") or {}).get("chrf"), lambda v: f"{v:.1f}"),
    ("BLEU", lambda r: (r.get("accuracy") or {}).get("bleu"), lambda v: f"{v:.1f}"),
    ("prefers chosen", lambda r: (r.get("preference") or {}).get("accuracy"), lambda v: f"{v:.0%}"),
    ("gen t/s", lambda r: r["speed"]["gen_tokens_per_s"], lambda v: f"{v:,.1f}"),
]
HISTORY_KEPT = 20  # results per variant in cache/<model>/eval/history.jsonl
IMATRIX_COMPARED = ("size", "KL", "top-1", "perplexity", "exact match", "chrF")


def imatrix_rows(by_variant: dict[str, dict]) -> list[list[str]]:
    """Per quant type made with and without the importance matrix: each number "without → with",
    and how much the matrix changed the KL divergence. Pure."""
    shown = {label: show for label, _, show in HEADLINE}
    rows = []
    for variant, plain in by_variant.items():
        if not variant.endswith(WITHOUT_IMATRIX):
            continue
        quant = variant.removesuffix(WITHOUT_IMATRIX)
        before, after = headline(plain), headline(by_variant[quant])
        cells = [f"{shown[label](before[label])} → {shown[label](after[label])}" if label in before and label in after
                 else "—" for label in IMATRIX_COMPARED]
        kl_change = f"{after['KL'] / before['KL'] - 1:+.1%}" if before.get("KL") and "KL" in after else "—"
        rows.append([quant, *cells, kl_change])
    return rows


def headline(result: dict) -> dict[str, float]:
    return {label: value for label, read, _ in HEADLINE if (value := read(result)) is not None}


def change_words(before: dict[str, float], after: dict[str, float]) -> str:
    """"KL 0.0512 → 0.0301, exact match 84% → 79%": every headline number that moved. Pure."""
    words = [f"{label} {show(before[label])} → {show(after[label])}" for label, _, show in HEADLINE
             if label in before and label in after and show(before[label]) != show(after[label])]
    return ", ".join(words) or "no change"


def previous_results(history: list[dict], variant: str, current: dict[str, float]) -> dict[str, float] | None:
    """The last recorded result of `variant` that differs from `current`: the previous build's."""
    for entry in reversed(history):
        if entry["variant"] == variant and entry["metrics"] != current:
            return entry["metrics"]
    return None


def compare_with_history(root: Path, results: list[dict]) -> list[list[str]]:
    """Rows of (variant, what changed since the previous build that measured it), and the current
    results added to the model's history (kept under the cache, outside any task's outputs, so
    `doit clean` does not forget it)."""
    path = root / "eval" / "history.jsonl"
    history = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.is_file() else []
    rows = []
    for result in results:
        current = json.loads(json.dumps(headline(result)))  # as the file holds it
        before = previous_results(history, result["variant"], current)
        rows.append([result["variant"], "first build that measured it" if before is None else change_words(before, current)])
        latest = next((e for e in reversed(history) if e["variant"] == result["variant"]), None)
        if latest is None or latest["metrics"] != current:
            history.append({"variant": result["variant"], "metrics": current})
    kept = []
    for variant in dict.fromkeys(e["variant"] for e in history):
        kept += [e for e in history if e["variant"] == variant][-HISTORY_KEPT:]
    with atomic_file(path) as tmp:
        tmp.write_text("".join(json.dumps(e) + "\n" for e in kept), encoding="utf-8")
    return rows


def _estimated(log: list[dict]) -> str:
    """The train stage's estimate before it loaded the model, beside the measured peak."""
    estimate = next((r["estimated_memory_mb"] for r in log if "estimated_memory_mb" in r), None)
    return f" (estimated before training: {estimate:,.0f} MB)" if estimate else ""


def train_log(path: Path | None) -> list[dict]:
    if not path or not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def build_blocks(nodes: list[Node], records: dict[str, dict], images: dict[str, bytes], store: str) -> list[Block]:
    last = max((r["build"] for r in records.values()), default=None)
    states = {task: "restored" if r.get("restored") else "ran" for task, r in records.items() if r["build"] == last}
    images["graph.png"] = graph_png(nodes, states)
    rows = []
    for node in nodes:
        record = records.get(node.task)
        state = states.get(node.task, "up to date")
        rows.append([f"`{node.task}`", f"restored from {record['restored']}" if state == "restored" else state,
                     f"{record.get('built_wall_s', record['wall_s']):,.1f} s" if record else "—",
                     *_memory_cells(record if state != "restored" else None),
                     record["finished"].replace("T", " ").replace("+00:00", " UTC") if record else "never"])
    peak_of = {r.get("peak_of") for r in records.values()}
    restored = sum(1 for state in states.values() if state == "restored")
    return [Heading(2, "Build"),
            Text(f"The last build started {last.replace('T', ' ').replace('+00:00', ' UTC') if last else 'never'}; "
                 f"{len(states) - restored} of {len(nodes)} tasks ran in it, {restored} were restored from the action "
                 f"cache, the others were up to date. Wall time and peak memory are each task's last run (for a "
                 f"restored task, the run that built it)" + ("" if peak_of <= {"task"} else
                                                             " (peak memory: of the whole doit process)") + ". "
                 "Memory is the peak of what the process allocated while the task ran (anonymous memory: what "
                 "decides whether a build fits the machine); mapped file pages (model files read through mmap, "
                 "which the kernel drops under pressure) are counted apart, as is their peak sum with it "
                 f"(resident). {store}"),
            Table(["task", "last build", "wall time", "memory", "mapped file pages", "resident", "last rebuilt"], rows),
            Heading(3, "Task graph"),
            Text("Generated from the doit graph (an arrow: reads the output of, or waits for). "
                 "Green: ran in the last build; blue: restored from the action cache; grey: up to date."),
            Mermaid(mermaid(nodes, states), "graph.png")]


def _memory_cells(record: dict | None) -> list[str]:
    """Anonymous peak, mapped-file peak, resident peak; a record from before both were kept has only the last."""
    if not record:
        return ["—", "—", "—"]
    return [f"{record['peak_anon_mb']:,.0f} MB" if "peak_anon_mb" in record else "—",
            f"{record['peak_file_mb']:,.0f} MB" if "peak_file_mb" in record else "—",
            f"{record['peak_rss_mb']:,.0f} MB"]


def store_words(size) -> str:
    """The action cache's size, for the build section (`size`: a stages.ground.cache.StoreSize)."""
    return (f"The action cache holds {size.entries} entries, {_mb(size.size)} in {size.blobs} files, "
            f"{_mb(size.own)} of them in no output folder (`doit cache-gc --keep-size …` trims it).")


def run(models: list[ModelInputs], nodes: list[Node], spec_name: str, cache: Path, out_dir: Path, store: str,
        experiments: list[Experiment] = (), metrics_moved: list[str] | None = None) -> None:
    images: dict[str, bytes] = {}
    blocks: list[Block] = [Heading(1, f"modelmake report: {spec_name}"),
                           Text(f"Built by modelmake {__version__}. Rebuild this page alone with `doit report` "
                                "(or `doit -a report` when nothing changed).")]
    if metrics_moved is not None:  # DVC's `metrics diff`: what a reviewer of the change wants to see first
        blocks.append(Text(f"Against {spec_name}.lock: " + ("; ".join(metrics_moved) if metrics_moved else
                                                          "every eval figure it records is unchanged") + "."))
    for experiment in experiments:
        blocks += experiment_blocks(experiment, images)
    for model in models:
        blocks += model_blocks(model, images)
    blocks += build_blocks(nodes, runlog.read_records(cache), images, store)
    with atomic_file(out_dir / "REPORT.md") as tmp:
        tmp.write_text(to_markdown(blocks), encoding="utf-8")
    for name, data in images.items():
        with atomic_file(out_dir / name) as tmp:
            tmp.write_bytes(data)
    with atomic_file(out_dir / "report.html") as tmp:
        tmp.write_text(to_html(blocks, images, f"modelmake report: {spec_name}"), encoding="utf-8")
    print(f"{out_dir / 'REPORT.md'}, {out_dir / 'report.html'}")
