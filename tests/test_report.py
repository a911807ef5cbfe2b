"""The report of the default spec: its tables hold the measured numbers, the loss curve is a real
PNG, the Mermaid flowchart parses and renders with the real Mermaid (npm) in headless Chromium,
and the self-contained HTML shows its tables in a Chromium screenshot."""

import html
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from helpers import REPO, doit

from stages import report

pytestmark = pytest.mark.slow
MERMAID_JS = REPO / "tests/js/node_modules/mermaid/dist/mermaid.min.js"
HEADER_BLUE = (0xDD, 0xE7, 0xF5)  # report.STYLE's table-header background


def chromium(tmp_path, *args: str) -> str:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "Debian's chromium is needed: apt-get install chromium (see README, Tests)"
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--user-data-dir={tmp_path / 'chromium-profile'}", *args],
                          capture_output=True, text=True, timeout=180)
    return proc.stdout


def render_mermaid(tmp_path, source: str) -> str:
    """What Mermaid left in the page after parsing and rendering `source`: an <svg>, or 'MERMAID ERROR: …'."""
    assert MERMAID_JS.is_file(), "Mermaid is needed: npm ci --prefix tests/js (see README, Tests)"
    page = tmp_path / "mermaid.html"
    page.write_text(f"""<!doctype html><html><body><div id="out"></div>
<script src="{MERMAID_JS.as_uri()}"></script>
<script>
mermaid.initialize({{startOnLoad: false}});
const source = {json.dumps(source)};
mermaid.parse(source)
  .then(() => mermaid.render("graph", source))
  .then(({{svg}}) => {{ document.getElementById("out").innerHTML = svg; }})
  .catch((e) => {{ document.getElementById("out").textContent = "MERMAID ERROR: " + e.message; }});
</script></body></html>""")
    dom = chromium(tmp_path, "--virtual-time-budget=20000", "--dump-dom", page.as_uri())
    return re.search(r'<div id="out">(.*?)</div>\s*<script', dom, re.S).group(1)


@pytest.fixture(scope="module")
def built(default_build):
    return default_build["folder"] / "cache/report"


def test_report_tables_hold_the_measured_numbers(built, default_build):
    text = (built / "REPORT.md").read_text()
    rows = {}  # the first table that names a variant is the eval table ("Since the previous build" comes later)
    for line in text.splitlines():
        if line.startswith("| "):
            rows.setdefault(line.split("|")[1].strip(), line)
    for variant in ("base", "F16", "Q4_K_M", "Q8_0", "lora"):
        measured = json.loads((default_build["cache"] / f"eval/{variant}.json").read_text())
        assert f"{measured['quality']['perplexity']:.4f}" in rows[variant]
        assert f"{measured['speed']['gen_tokens_per_s']:,.1f}" in rows[variant]
    q4 = json.loads((default_build["cache"] / "eval/Q4_K_M.json").read_text())["quality"]
    assert f"{q4['kl_divergence']:.5f}" in rows["Q4_K_M"] and f"{q4['top1_agreement']:.1%}" in rows["Q4_K_M"]
    assert "| answer perplexity |" in text and "| validation loss (train stage, PyTorch) |" in text
    sums = (default_build["cache"] / "SHA256SUMS").read_text()
    q4_gguf = next(line.split()[0] for line in sums.splitlines() if line.endswith("gguf/smollm2-demo-merged.Q4_K_M.gguf"))
    assert f"| `gguf/smollm2-demo-merged.Q4_K_M.gguf` | 105.5 MB | `{q4_gguf}` |" in text
    train_row = next(line for line in text.splitlines() if line.startswith("| `train:smollm2-demo` |"))
    memory = re.match(r"\| `train:smollm2-demo` \| (ran|up to date) \| [\d.,]+ s \| ([\d,]+) MB \| ([\d,]+) MB \| "
                      r"([\d,]+) MB \| 20\d\d-", train_row)
    assert memory, train_row
    allocated, mapped, resident = (int(memory.group(i).replace(",", "")) for i in (2, 3, 4))
    assert 0 < allocated <= resident and 0 < mapped <= resident, "memory and mapped file pages are parts of resident"
    log = [json.loads(line) for line in (default_build["cache"] / "adapter/train_log.jsonl").read_text().splitlines()]
    measured_peak, estimate = max(r.get("peak_memory_mb", 0) for r in log), log[0]["estimated_memory_mb"]
    assert f"peak memory {measured_peak:,.0f} MB (estimated before training: {estimate:,.0f} MB)." in text
    assert 0.5 < estimate / measured_peak < 2, "the estimate is of the run's size"


def test_loss_curve_is_a_real_png(built):
    from matplotlib import image

    path = built / "smollm2-demo.loss.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = image.imread(path)
    assert pixels.shape[:2] == (360, 750)
    assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 50, "lines and text, not a blank image"


def test_mermaid_flowchart_is_the_doit_graph_and_renders_with_mermaid(built, tmp_path):
    source = re.search(r"```mermaid\n(.*?)\n```", (built / "REPORT.md").read_text(), re.S).group(1)
    labels = dict(re.findall(r'^  (t\d+)\["([^"]+)"\]$', source, re.M))
    edges = {(labels[a], labels[b]) for a, b in re.findall(r"^  (t\d+) --> (t\d+)$", source, re.M)}
    for edge in [("import:smollm2-demo", "train:smollm2-demo.preview"), ("train:smollm2-demo.preview", "train:smollm2-demo"),
                 ("train:smollm2-demo", "adapter:smollm2-demo"),
                 ("train:smollm2-demo", "merge:smollm2-demo"), ("merge:smollm2-demo", "convert:smollm2-demo-merged"),
                 ("convert:smollm2-demo-merged", "quantize:smollm2-demo-merged.imatrix"),
                 ("quantize:smollm2-demo-merged.imatrix", "quantize:smollm2-demo-merged-Q4_K_M"),
                 ("quantize:smollm2-demo-merged-Q4_K_M", "eval:smollm2-demo-Q4_K_M"),
                 ("eval:smollm2-demo-Q4_K_M", "parity:smollm2-demo-Q4_K_M"),
                 ("parity:smollm2-demo-Q4_K_M", "package:smollm2-demo-Q4_K_M")]:
        assert edge in edges
    for implied in [("import:smollm2-demo", "manifest:smollm2-demo"), ("eval:smollm2-demo-Q4_K_M", "package:smollm2-demo-Q4_K_M")]:
        assert implied not in edges, "edges implied by a path are left out"

    rendered = render_mermaid(tmp_path, source)
    assert rendered.startswith("<svg") and 'aria-roledescription="flowchart-v2"' in rendered
    for label in labels.values():
        assert html.escape(label) in rendered
    marked = re.findall(r'class="node default (ran|uptodate)"', rendered)
    assert len(marked) == len(labels), "every task is a node, marked as ran or up to date"
    broken = render_mermaid(tmp_path, source.replace("-->", "-->>", 1))  # the check can fail
    assert broken.startswith("MERMAID ERROR")


def test_html_report_is_self_contained_and_shows_its_tables(built, tmp_path):
    from matplotlib import image

    page = (built / "report.html").read_text()
    assert "data:image/png;base64," in page and "src=\"http" not in page and "<script" not in page
    shot = tmp_path / "report.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,1400", (built / "report.html").as_uri())
    pixels = (image.imread(shot)[..., :3] * 255).round().astype(int)
    header_pixels = int(np.all(pixels == HEADER_BLUE, axis=-1).sum())
    assert header_pixels > 5000, "the variant table's header row is painted"
    dom = chromium(tmp_path, "--dump-dom", (built / "report.html").as_uri())
    assert dom.count("<table>") >= 4 and ">Q4_K_M</td>" in dom


def test_doit_report_rebuilds_the_report_alone(default_build):
    built = default_build["folder"] / "cache/report"
    (built / "REPORT.md").unlink()
    assert doit(default_build["spec"], "report").ran == ["report"]
    assert (built / "REPORT.md").is_file()
    assert doit(default_build["spec"]).ran == [], "and then the build is up to date, the report too"


def test_transitive_reduction_keeps_only_direct_steps():
    needs = {"a": set(), "b": {"a"}, "c": {"a", "b"}, "d": {"a", "b", "c"}}
    assert report.transitive_reduction(needs) == {"a": set(), "b": {"a"}, "c": {"b"}, "d": {"c"}}


def test_each_variant_is_compared_with_the_previous_build_that_measured_it(tmp_path):
    from stages import report

    def result(kl, exact):
        return {"variant": "Q4_K_M", "size_bytes": 105_500_000, "quality": {"perplexity": 80.0, "kl_divergence": kl},
                "accuracy": {"exact_match": exact, "chrf": 70.0, "bleu": 50.0}, "speed": {"gen_tokens_per_s": 120.0}}

    (tmp_path / "eval").mkdir()
    assert report.compare_with_history(tmp_path, [result(0.1175, 0.84)]) == [["Q4_K_M", "first build that measured it"]]
    assert report.compare_with_history(tmp_path, [result(0.0990, 0.79)]) == \
        [["Q4_K_M", "KL 0.11750 → 0.09900, exact match 84% → 79%"]]
    # the report rebuilt with no new measurement still compares with the build before
    assert report.compare_with_history(tmp_path, [result(0.0990, 0.79)]) == \
        [["Q4_K_M", "KL 0.11750 → 0.09900, exact match 84% → 79%"]]
    assert len((tmp_path / "eval/history.jsonl").read_text().splitlines()) == 2


def test_imatrix_rows_put_each_number_without_the_matrix_beside_the_number_with_it():
    def result(variant, kl, exact):
        return {"variant": variant, "size_bytes": 105_500_000, "quality": {"perplexity": 80.0, "kl_divergence": kl,
                                                                           "top1_agreement": 0.9},
                "accuracy": {"exact_match": exact, "chrf": 70.0}, "speed": {"gen_tokens_per_s": 120.0}}

    by_variant = {r["variant"]: r for r in (result("F16", None, 0.5), result("Q4_K_M", 0.0990, 0.52),
                                            result("Q4_K_M-no-imatrix", 0.1175, 0.48))}
    assert report.imatrix_rows(by_variant) == [[
        "Q4_K_M", "105.5 MB → 105.5 MB", "0.11750 → 0.09900", "90.0% → 90.0%", "80.0000 → 80.0000", "48% → 52%",
        "70.0 → 70.0", "-15.7%"]]
    assert report.imatrix_rows({"Q4_K_M": by_variant["Q4_K_M"]}) == [], "nothing compared, no rows"
