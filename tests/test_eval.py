"""The eval stage: perplexity computed through llama.cpp agrees with PyTorch on the same tokens, the
KL of a model against itself is zero, quantization costs something measurable, the fine-tune's
effect shows, and a quality gate stops a variant from being packaged."""

import json

import numpy as np
import pytest
from helpers import doit, leftovers, write_spec

from stages import evaluate
from stages.ground.errors import BuildError
from stages.ground.spec import GateSpec


def _result(cache, variant):
    return json.loads((cache / "eval" / f"{variant}.json").read_text())


@pytest.mark.slow
def test_perplexity_of_the_f16_gguf_agrees_with_pytorch_on_the_same_tokens(default_build):
    """Tolerance: 1% relative. The GGUF holds the merged weights in f16 and llama.cpp multiplies
    in f16; PyTorch runs the merged float32 weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = default_build["cache"]
    quality = _result(cache, "F16")["quality"]
    records = [json.loads(line) for line in (cache / "eval/heldout.jsonl").read_text().splitlines()]
    documents = evaluate.tokenize(evaluate.Subject(cache / "gguf/smollm2-demo-merged.F16.gguf"),
                                  evaluate.read_documents(cache / "eval/heldout.jsonl"), 8192)
    tokenizer = AutoTokenizer.from_pretrained(cache / "merged")
    for record, document in zip(records, documents):  # llama.cpp splits the text as the train stage did
        expected = [tokenizer(record[k], add_special_tokens=False)["input_ids"] for k in ("prompt", "answer")]
        assert document.tokens == expected[0] + expected[1]
        assert document.is_answer == [False] * len(expected[0]) + [True] * len(expected[1])

    model = AutoModelForCausalLM.from_pretrained(cache / "merged", dtype=torch.float32).eval()
    tally = evaluate.Tally()
    with torch.no_grad():
        for window in evaluate.windows(documents, quality["context"]):
            tally.add(model(torch.tensor([window.tokens])).logits[0].numpy(), window)
    assert (tally.scored, tally.answers) == (quality["scored"], quality["answer_tokens"]) == (1214, 184)
    assert tally.perplexity == pytest.approx(quality["perplexity"], rel=0.01)
    assert tally.answer_perplexity == pytest.approx(quality["answer_perplexity"], rel=0.01)
    # The train stage's last validation loss is the mean NLL of the same answer tokens, in PyTorch.
    log = [json.loads(line) for line in (cache / "adapter/train_log.jsonl").read_text().splitlines()]
    assert np.log(quality["answer_perplexity"]) == pytest.approx(log[-1]["val_loss"], rel=0.02)


@pytest.mark.slow
def test_kl_of_f16_against_itself_is_zero_and_quantization_costs_something(default_build):
    cache = default_build["cache"]
    f16 = evaluate.Subject(cache / "gguf/smollm2-demo-merged.F16.gguf")
    documents = evaluate.tokenize(f16, evaluate.read_documents(cache / "eval/heldout.jsonl"), 8192)
    itself = evaluate.quality(evaluate.Job("smollm2-demo", "F16", f16, f16, None, ""), documents, 512, 2)
    assert itself["kl_divergence"] == pytest.approx(0, abs=1e-9)
    assert itself["top1_agreement"] == 1.0
    assert itself["perplexity"] == itself["reference_perplexity"] == pytest.approx(_result(cache, "F16")["quality"]["perplexity"])

    q4, q8, lora = (_result(cache, v)["quality"] for v in ("Q4_K_M", "Q8_0", "lora"))
    assert q4["kl_divergence"] > 0.01 and q4["top1_agreement"] < 0.99
    assert 0 < q8["kl_divergence"] < q4["kl_divergence"], "Q8_0 is closer to F16 than Q4_K_M"
    assert lora["kl_divergence"] < 1e-3 and lora["top1_agreement"] > 0.99, "base + GGUF LoRA ≈ merged"
    sizes = {v: _result(cache, v)["bits_per_weight"] for v in ("F16", "Q8_0", "Q4_K_M")}
    assert sizes["F16"] == pytest.approx(16, abs=0.01) and sizes["F16"] > sizes["Q8_0"] > sizes["Q4_K_M"]
    speed = _result(cache, "Q4_K_M")["speed"]
    assert speed["prompt_tokens_per_s"] > 0 and speed["gen_tokens_per_s"] > 0 and speed["runs"] == 3


@pytest.mark.slow
def test_fine_tune_lowers_the_answer_perplexity(default_build):
    before, after = (_result(default_build["cache"], v)["quality"] for v in ("base", "F16"))
    assert after["answer_perplexity"] < before["answer_perplexity"] / 3
    assert "reference_perplexity" not in before, "the base before fine-tuning is compared with nothing"


@pytest.mark.slow
def test_imported_tokenizer_splits_text_as_llama_cpp_does(default_build):
    """The train stage tokenizes with the imported Hugging Face tokenizer, llama.cpp with the GGUF's:
    they must agree, or the model is trained on tokens it never sees at inference."""
    from helpers import SMOLLM_GGUF
    from transformers import AutoTokenizer

    from stages.formats.tokenizer import PRETOKENIZER_PROBE

    text = "Multiply the two numbers.\n\n4 and 10, then 2025\n\n\n7.5 " + PRETOKENIZER_PROBE
    imported = AutoTokenizer.from_pretrained(default_build["cache"] / "base")
    (document,) = evaluate.tokenize(evaluate.Subject(SMOLLM_GGUF), [[(text, False)]], 8192)
    assert imported(text, add_special_tokens=False)["input_ids"] == document.tokens


def test_tally_and_windows_by_hand():
    documents = [evaluate.Window([5, 1, 2, 3, 4], [False, False, True, True, False]),
                 evaluate.Window([7], [False])]
    windows = evaluate.windows(documents, 3)
    assert [w.tokens for w in windows] == [[5, 1, 2], [3, 4]], "a one-token piece scores nothing and is dropped"
    logits = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]))
    reference = np.log(np.array([[0.25, 0.5, 0.25], [0.1, 0.1, 0.8]]))
    tally = evaluate.Tally()
    tally.add(np.vstack([logits, [[0, 0, 0]]]), evaluate.Window([0, 1, 2], [False, True, False]),
              np.vstack([reference, [[0, 0, 0]]]))
    assert tally.scored == 2 and tally.answers == 1
    assert tally.perplexity == pytest.approx(np.exp(-(np.log(0.25) + np.log(0.8)) / 2))
    assert tally.answer_perplexity == pytest.approx(4.0)
    assert tally.kl == pytest.approx(0.25 * np.log(0.25 / 0.5) + 0.5 * np.log(0.5 / 0.25))
    assert tally.top1 == 1


def test_speed_runs_shrink_with_the_model_unless_the_spec_sets_them():
    """A 7B F16 generates about a token a second on a laptop CPU: three runs of 32 tokens per
    variant would cost minutes of every build. Above 1 GiB the default runs are shorter."""
    from stages import report
    from stages.ground.spec import EvalSpec

    assert evaluate.speed_settings(EvalSpec(), 270_000_000) == (128, 32, 3)
    assert evaluate.speed_settings(EvalSpec(), 6_200_000_000) == (32, 8, 1)
    assert evaluate.speed_settings(EvalSpec(speed_runs=5, speed_tokens=16), 6_200_000_000) == (32, 16, 5)

    def result(variant, prompt, gen, runs):
        return {"variant": variant, "speed": {"prompt_tokens": prompt, "gen_tokens": gen, "runs": runs}}

    same = [result("F16", 128, 32, 3), result("Q8_0", 128, 32, 3)]
    assert report.speed_words(same) == ("prompt processing of 128 tokens and generation of 32 tokens, "
                                        "median of 3 runs after an untimed one")
    mixed = [result("BF16", 32, 8, 1), result("Q4_K_M", 128, 32, 3), result("lora", 32, 8, 1)]
    assert report.speed_words(mixed).startswith(
        "BF16, lora: prompt processing of 32 tokens and generation of 8 tokens, one timed run after an untimed one; "
        "Q4_K_M: prompt processing of 128 tokens and generation of 32 tokens, median of 3 runs")
    assert "a GGUF over 1 GiB gets shorter speed runs" in report.speed_words(mixed)


def test_gate_failures_name_the_measure_and_the_limit():
    result = {"quality": {"perplexity": 11.0, "reference_perplexity": 10.0, "kl_divergence": 0.2,
                          "top1_agreement": 0.8}}
    assert evaluate.gate_failures(result, GateSpec(max_ppl_increase=0.2, max_kl=0.5, min_top1=0.5)) == []
    failures = evaluate.gate_failures(result, GateSpec(max_ppl_increase=0.05, max_kl=0.1, min_top1=0.9))
    assert failures == [
        "perplexity 11.0000 is +10.00% over the reference's 10.0000 (max_ppl_increase = 0.05 allows +5.00%)",
        "mean KL divergence 0.200000 exceeds max_kl = 0.1",
        "top-1 agreement 80.00% is under min_top1 = 0.9"]


GATED = """
[[models]]
name = "tiny"
base = "tiny"
quantize = ["Q4_0", "Q8_0"]

[models.eval]
text = "heldout.txt"
speed_runs = 1

[models.eval.gate.Q4_0]
max_kl = {limit}
"""


@pytest.mark.slow
def test_a_variant_over_its_gate_fails_the_build_and_is_not_packaged(tmp_path, tiny_llama):
    import shutil

    shutil.copytree(tiny_llama, tmp_path / "tiny")
    (tmp_path / "heldout.txt").write_text("The quick brown fox jumps over the lazy dog. " * 20)
    spec = write_spec(tmp_path, GATED.format(limit="0.0"))
    failed = doit(spec, check=False)
    assert failed.returncode != 0
    assert "Q4_0 fails its quality gate: mean KL divergence" in failed.output
    assert "exceeds max_kl = 0.0. It is not packaged. Loosen [models.eval.gate.Q4_0]" in failed.output
    assert "Traceback" not in failed.output
    cache = tmp_path / "cache/tiny"
    measured = _result(cache, "Q4_0")
    assert measured["quality"]["kl_divergence"] > 0
    assert f"{measured['quality']['kl_divergence']:.6f}" in failed.output, "the message gives the measured value"
    assert not (cache / "package/Q4_0").exists()
    assert not [p for p in leftovers(tmp_path / "cache") if ".tmp-" in p], "no half-written file"

    spec.write_text(GATED.format(limit="100.0"))
    passed = doit(spec)
    assert "eval:tiny-Q4_0" not in passed.ran, "a gate is checked against the stored measurement, not re-measured"
    assert "package:tiny-Q4_0" in passed.ran
    assert (cache / "package/Q4_0/files.b3").is_file()


@pytest.mark.parametrize("gate, message", [
    ('[models.eval.gate.Q5_K_M]\nmax_kl = 0.1', "eval.gate.Q5_K_M: not a variant of this model; its variants are F16, Q8_0"),
    ('[models.eval.gate.F16]\nmax_kl = 0.1', "eval.gate.F16: F16 is not compared with anything"),
    ('[models.eval.gate.Q8_0]\nmax_kl = 0.1', "eval.gate.Q8_0 compares outputs on held-out text, and this model has none"),
    ('[models.eval.gate.Q8_0]\nmax_klx = 0.1', "max_klx"),
    ('[models.eval]\ntext = "missing.txt"', "eval text"),
])
def test_eval_spec_errors_name_the_field(tmp_path, tiny_llama, gate, message):
    import shutil

    shutil.copytree(tiny_llama, tmp_path / "tiny")
    spec = write_spec(tmp_path, f'[[models]]\nname = "tiny"\nbase = "tiny"\nquantize = ["Q8_0"]\n\n{gate}\n')
    result = doit(spec, check=False)
    assert result.returncode != 0 and message in result.output and "Traceback" not in result.output


def test_a_missing_gguf_is_a_build_error(tmp_path):
    job = evaluate.Job("m", "Q8_0", evaluate.Subject(tmp_path / "nope.gguf"), None, None, "")
    with pytest.raises(BuildError, match="nope.gguf is not a readable GGUF file"):
        evaluate.run(job, evaluate.EvalSpec(), tmp_path / "out.json", tmp_path)
    assert not (tmp_path / "out.json").exists()
