"""Answer accuracy: greedy answers scored with sacrebleu (called, not re-implemented), the fine-tune's
effect on what the model says, answer gates, and clear errors for bad prompt files."""

import json
import shutil

import pytest
import sacrebleu
from helpers import doit, leftovers, write_spec

from stages import accuracy, evaluate
from stages.ground.errors import BuildError
from stages.ground.spec import GateSpec

HYPOTHESES = ["Answer: Paris.", "Answer: 12.", "the cat sat on the mat", "Answer:  ATHENS. "]
REFERENCES = ["Answer: Paris.", "Answer: 11.", "the cat is on the mat", "Answer: Athens."]


def test_scores_are_sacrebleus_own():
    found = accuracy.scores(HYPOTHESES, REFERENCES, reference_answers=HYPOTHESES[:3] + ["other"])
    assert found["chrf"] == sacrebleu.corpus_chrf(HYPOTHESES, [REFERENCES]).score
    assert found["bleu"] == sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES]).score
    assert found["exact_match"] == 0.5  # Paris, and Athens after normalization
    assert found["same_as_reference"] == 0.75
    rows = accuracy.answer_rows([accuracy.Prompt("q", r) for r in REFERENCES], HYPOTHESES, [True, True, False, True])
    assert [r["ended_turn"] for r in rows] == [True, True, False, True]
    assert [r["chrf"] for r in rows] == [sacrebleu.sentence_chrf(h, [r]).score for h, r in zip(HYPOTHESES, REFERENCES)]
    assert [r["exact"] for r in rows] == [True, False, False, True]


def test_normalization_is_case_unicode_and_whitespace_only():
    assert accuracy.normalize("  Answer:\u00a0 PARIS.\n") == "answer: paris."
    assert accuracy.normalize("Ｐａｒｉｓ") == "paris"  # NFKC: full-width letters
    assert accuracy.normalize("Paris") != accuracy.normalize("Paris.")


def test_answer_gates_by_hand():
    result = {"accuracy": {"exact_match": 0.5, "chrf": 40.0, "reference_exact_match": 0.8}}
    assert evaluate.gate_failures(result, GateSpec(min_exact_match=0.5, max_exact_match_drop=0.3, min_chrf=40)) == []
    failures = evaluate.gate_failures(result, GateSpec(min_exact_match=0.6, max_exact_match_drop=0.2, min_chrf=41))
    assert failures == ["exact match 50.00% is under min_exact_match = 0.6",
                        "exact match 50.00% is 30.00% under the reference's 80.00% (max_exact_match_drop = 0.2)",
                        "chrF 40.00 is under min_chrf = 41.0"]
    assert evaluate.gate_failures({"accuracy": None}, GateSpec(min_chrf=1)) == ["it answered no prompts to gate on"]
    talkative = {"accuracy": {"exact_match": 1.0, "chrf": 90.0, "terminated": 0.75}}
    assert evaluate.gate_failures(talkative, GateSpec(min_terminated=0.75)) == []
    assert evaluate.gate_failures(talkative, GateSpec(min_terminated=0.8)) == [
        "75.00% of the answers end their turn before max_new_tokens, under min_terminated = 0.8: the served model "
        "would talk on until cut off"]


@pytest.mark.parametrize("text, message", [
    ("", "no prompts in the file"),
    ('{"prompt": "Hi?", "answer": "Hello."}\n{"prompt": "Where?"}\n', "prompts.jsonl:2: the record has no \"answer\" string"),
    ('{"answer": "x"}\n', "prompts.jsonl:1: the record needs a \"prompt\" string or a \"messages\" list"),
    ('{"prompt": "Hi?", "answer": \n', "prompts.jsonl:1: not valid JSON"),
])
def test_bad_prompts_files_name_the_line(tmp_path, text, message):
    (tmp_path / "prompts.jsonl").write_text(text)
    with pytest.raises(BuildError, match=message):
        accuracy.read_prompts_file(tmp_path / "prompts.jsonl")


@pytest.mark.slow
def test_the_fine_tune_answers_in_the_trained_style_and_beats_the_base(default_build):
    cache = default_build["cache"]
    results = {v: json.loads((cache / "eval" / f"{v}.json").read_text()) for v in ("base", "F16", "Q4_K_M", "Q8_0", "lora")}
    base = results["base"]["accuracy"]
    assert base["prompts"] == 27 and len(base["answers"]) == 27
    for variant in ("F16", "Q8_0", "lora"):
        tuned = results[variant]["accuracy"]
        styled = sum(a["answer"].startswith("Answer:") for a in tuned["answers"])
        assert styled >= 24, f"{variant}: {styled} of 27 answers in the trained style"
        # Measured on the demo data (27 prompts): the base 0% exact, chrF 9.0; F16, Q8_0 and lora 52–56%,
        # chrF 72.5–74.2, every answer in the trained style; the margins asserted are about half of that
        assert tuned["exact_match"] >= base["exact_match"] + 0.25, variant
        assert tuned["chrf"] >= base["chrf"] + 20, variant
    assert "same_as_reference" not in base and "same_as_reference" not in results["F16"]["accuracy"]
    assert results["Q8_0"]["accuracy"]["same_as_reference"] >= 0.8, "Q8_0 answers as F16 does, nearly always"
    report = (default_build["folder"] / "cache/report/REPORT.md").read_text()
    assert "| exact match | chrF | BLEU | same answers |" in report
    # The termination probe: the fine-tune ends its turn by itself (every answer, measured), as trained to.
    for variant in ("F16", "Q8_0", "Q4_K_M", "lora"):
        assert results[variant]["accuracy"]["terminated"] >= 0.9, variant
    assert "| release | conversations | llama-server | Ollama | end of turn | ends its turn | served answers |" in report
    # The same prompts through llama-server's /v1/chat/completions, as Docker Model Runner's clients ask
    # them: the same greedy answers, every one (measured: 27/27 for each release).
    for variant in ("Q4_K_M", "Q8_0", "lora"):
        served = json.loads((cache / "parity" / f"{variant}.json").read_text())["served_answers"]
        assert (served["identical"], served["answers"]) == (27, 27), (variant, served["differences"])
    assert report.count("| identical 27/27 |") == 3


GATED = """
[[models]]
name = "tiny"
base = "tiny"
quantize = ["Q4_0"]

[models.eval]
prompts = "prompts.jsonl"
max_new_tokens = 4

[models.eval.gate.Q4_0]
min_exact_match = {limit}
"""


@pytest.mark.slow
def test_an_answer_gate_fails_the_build_naming_variant_value_and_limit(tmp_path, tiny_llama):
    shutil.copytree(tiny_llama, tmp_path / "tiny")
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Say {w}.", "answer": w}) + "\n"
                                                    for w in ("yes", "no", "maybe")))
    spec = write_spec(tmp_path, GATED.format(limit="1.01"))
    failed = doit(spec, check=False)
    assert failed.returncode != 0 and "Traceback" not in failed.output
    measured = json.loads((tmp_path / "cache/tiny/eval/Q4_0.json").read_text())["accuracy"]
    assert f"Q4_0 fails its quality gate: exact match {measured['exact_match']:.2%} is under min_exact_match = 1.01" \
        in failed.output
    assert not (tmp_path / "cache/tiny/package/Q4_0").exists()
    assert not [p for p in leftovers(tmp_path / "cache") if ".tmp-" in p]
    assert [a["expected"] for a in measured["answers"]] == ["yes", "no", "maybe"]
