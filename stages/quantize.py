"""quantize: GGUF → GGUF of a llama.cpp quant type, with llama.cpp's own quantizer.

The output is what `llama-quantize IN OUT TYPE` writes: the same code, reached through
llama-cpp-python, so fallbacks (rows not a multiple of 256 …) are llama.cpp's own.

With `[models.quantize] imatrix`, llama.cpp's `llama-imatrix` first gathers an importance matrix
(which weights the activations lean on) over calibration text: the training set as the train stage
formats it, or the user's file. Then `llama-quantize --imatrix` quantizes with it, because only the
tool can hand a matrix to the quantizer. Both tools are built from the installed llama-cpp-python's
own source (`stages.ground.llamacpp`). The quantized GGUF records the matrix's and the calibration
text's file names (`quantize.imatrix.*`), so both are passed as names relative to their folder:
a host path would make the bytes differ between machines.
"""

from __future__ import annotations

import os
from pathlib import Path

from .ground import llamacpp
from .ground.atomic import atomic_file
from .ground.device import available_cores
from .ground.errors import BuildError
from .ground.spec import QUANT_TYPES, WITHOUT_IMATRIX, TrainSpec
from .ground.task import ModelBuild, Task

REVISION = 1
TOOLS = ("llama-cpp-python", "transformers", "tokenizers")  # the last two format the calibration text


def run(in_path: Path, out_path: Path, quant_type: str, threads: int = 0) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[quant_type]
    params.nthread = threads or available_cores()
    with atomic_file(out_path) as tmp, llamacpp.captured_llama_log() as log:
        status = llama_cpp.llama_model_quantize(str(in_path).encode(), str(tmp).encode(), params)
        if status != 0:
            tail = "".join(log[-5:]).strip().replace("\n", " | ")
            raise BuildError(f"llama.cpp could not quantize {in_path} to {quant_type} (status {status}): {tail}")
        size_in, size_out = os.path.getsize(in_path), os.path.getsize(tmp)
    print(f"{out_path.name}: {size_out / 1e6:.1f} MB, {size_out / size_in:.0%} of {in_path.name}")


def run_with_imatrix(in_path: Path, out_path: Path, quant_type: str, imatrix: Path, threads: int = 0) -> None:
    with atomic_file(out_path) as tmp:
        # the tool runs in the matrix's folder (the GGUF records the name it is given), so every other path is absolute
        args = ["--imatrix", imatrix.name, str(in_path.absolute()), str(tmp.absolute()), quant_type,
                str(threads or available_cores())]
        llamacpp.run("llama-quantize", args, imatrix.parent,
                     f"quantize {in_path.name} to {quant_type} with {imatrix.name}")
        size_in, size_out = os.path.getsize(in_path), os.path.getsize(tmp)
    print(f"{out_path.name}: {size_out / 1e6:.1f} MB, {size_out / size_in:.0%} of {in_path.name} (imatrix)")


# ---- the importance matrix ----

def calibration_text(train: TrainSpec, base_dir: Path) -> str:
    """The training split, each conversation as the train stage writes it (chat template, system
    prompt, end of turn), one after another: the text the fine-tuned model was shaped on."""
    from transformers import AutoTokenizer

    from .train import split_examples, written

    training, _ = split_examples(train)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    return "".join("".join(written(e, tokenizer, train.template, train.system)) + "\n" for e in training)


def write_calibration(train: TrainSpec, base_dir: Path, out_path: Path) -> None:
    text = calibration_text(train, base_dir)
    with atomic_file(out_path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    print(f"{out_path.name}: {len(text):,} characters of calibration text")


def make_imatrix(model_path: Path, calibration: Path, out_path: Path, context: int, threads: int = 0) -> None:
    """llama-imatrix over the calibration text, in chunks of `context` tokens (perplexity off)."""
    # the tool runs in the text's folder (the matrix records the name it is given), so the other paths are absolute
    args = ["-m", str(model_path.absolute()), "-f", calibration.name, "-c", str(context), "--no-ppl",
            "--parse-special", "--output-frequency", "1000000", "-t", str(threads or available_cores())]
    with atomic_file(out_path) as tmp:
        try:
            log = llamacpp.run("llama-imatrix", [*args, "-o", str(tmp.absolute())], calibration.parent,
                               f"compute an importance matrix on {calibration}")
        except BuildError as err:
            hint = (f"; {calibration} is too short for chunks of {context} tokens: give more text, or lower "
                    "[models.quantize] imatrix_context") if "you need at least" in str(err) else ""
            raise BuildError(f"{err}{hint}") from None
        if not tmp.is_file():
            raise BuildError(f"llama-imatrix wrote no importance matrix for {model_path.name}: {log[-300:]}")
    print(f"{out_path.name}: importance matrix of {model_path.name} over {calibration.name}")


def imatrix_path(build: ModelBuild) -> Path:
    return build.paths.root / "imatrix" / f"{build.release}.imatrix.gguf"


def tasks(build: ModelBuild) -> list[Task]:
    model, paths, release = build.model, build.paths, build.release
    converted = paths.gguf(release, model.outtype.upper())
    options = model.quantize_options
    found, imatrix = [], imatrix_path(build) if model.imatrix else None
    after = []
    if imatrix:
        after = ["tools"]
        calibration = options.imatrix if options.imatrix is not True else paths.calibration
        if options.imatrix is True:
            found.append(Task(
                f"{paths.data_name}.calibration", "calibration text: the training set as the train stage formats it",
                write_calibration, {"train": model.train, "base_dir": paths.base, "out_path": calibration},
                model.train.split_params(),
                inputs=paths.base_files() + model.train.data_files, outputs=[calibration]))
        found.append(Task(
            f"{release}.imatrix", f"importance matrix of {converted.name} over {calibration.name} (llama-imatrix)",
            make_imatrix, {"model_path": converted, "calibration": calibration, "out_path": imatrix,
                           "context": build.context(options.imatrix_context), "threads": build.spec.threads},
            {"context": build.context(options.imatrix_context), **llamacpp.fingerprint_versions()},
            inputs=[converted, calibration], outputs=[imatrix], after=after))
    for quant in model.quantize:
        out = paths.gguf(release, quant)
        if imatrix:
            found.append(Task(
                f"{release}-{quant}", f"GGUF {model.outtype} → {quant} with the imatrix (llama-quantize)",
                run_with_imatrix, {"in_path": converted, "out_path": out, "quant_type": quant, "imatrix": imatrix,
                                   "threads": build.spec.threads},
                {"type": quant, "imatrix": True, **llamacpp.fingerprint_versions()},
                inputs=[converted, imatrix], outputs=[out], after=after))
        else:
            found.append(plain_task(build, quant, quant))
    found += [plain_task(build, quant, quant + WITHOUT_IMATRIX) for quant in model.without_imatrix]
    return found


def plain_task(build: ModelBuild, quant: str, variant: str) -> Task:
    """A quant type without an importance matrix: a release, or (`compare_without_imatrix`) the
    yardstick the matrix is measured against."""
    converted = build.paths.gguf(build.release, build.model.outtype.upper())
    out = build.paths.gguf(build.release, variant)
    purpose = "" if variant == quant else ", without the imatrix, to compare (not released)"
    return Task(f"{build.release}-{variant}", f"GGUF {build.model.outtype} → {quant} (llama.cpp){purpose}", run,
                {"in_path": converted, "out_path": out, "quant_type": quant, "threads": build.spec.threads},
                {"type": quant}, inputs=[converted], outputs=[out])
