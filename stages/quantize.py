"""quantize: GGUF → GGUF of a llama.cpp quant type, with llama.cpp's own quantizer.

The output is what `llama-quantize IN OUT TYPE` writes: the same code, reached through
llama-cpp-python, so fallbacks (rows not a multiple of 256 …) are llama.cpp's own.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path

from .build.atomic import atomic_file
from .build.errors import BuildError
from .build.spec import QUANT_TYPES
from .build.task import ModelBuild, Task

REVISION = 1
TOOLS = ("llama-cpp-python",)


@contextlib.contextmanager
def captured_llama_log():
    """Collect llama.cpp's log (a line per tensor) instead of printing it; yields the lines."""
    import llama_cpp
    import llama_cpp._logger

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        lines.append(text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(llama_cpp._logger.llama_log_callback, ctypes.c_void_p(0))


def run(in_path: Path, out_path: Path, quant_type: str, threads: int = 0) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[quant_type]
    params.nthread = threads  # 0: llama.cpp uses every core
    with atomic_file(out_path) as tmp, captured_llama_log() as log:
        status = llama_cpp.llama_model_quantize(str(in_path).encode(), str(tmp).encode(), params)
        if status != 0:
            tail = "".join(log[-5:]).strip().replace("\n", " | ")
            raise BuildError(f"llama.cpp could not quantize {in_path} to {quant_type} (status {status}): {tail}")
        size_in, size_out = os.path.getsize(in_path), os.path.getsize(tmp)
    print(f"{out_path.name}: {size_out / 1e6:.1f} MB, {size_out / size_in:.0%} of {in_path.name}")


def tasks(build: ModelBuild) -> list[Task]:
    model, paths, release = build.model, build.paths, build.release
    converted = paths.gguf(release, model.outtype.upper())
    return [Task(f"{release}-{quant}", f"GGUF {model.outtype} → {quant} (llama.cpp)", run,
                 {"in_path": converted, "out_path": paths.gguf(release, quant), "quant_type": quant,
                  "threads": build.spec.threads},
                 {"type": quant}, inputs=[converted], outputs=[paths.gguf(release, quant)])
            for quant in model.quantize]
