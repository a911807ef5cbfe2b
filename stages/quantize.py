"""quantize: GGUF → GGUF of a llama.cpp quant type, with llama.cpp's own quantizer.

The output is what `llama-quantize IN OUT TYPE` writes: the same code, reached through
llama-cpp-python, so fallbacks (rows not a multiple of 256 …) are llama.cpp's own.
"""

from __future__ import annotations

from pathlib import Path

from .atomic import atomic_file
from .errors import BuildError
from .spec import QUANT_TYPES


def run(in_path: Path, out_path: Path, quant_type: str, threads: int = 0) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[quant_type]
    params.nthread = threads  # 0: llama.cpp uses every core
    with atomic_file(out_path) as tmp:
        status = llama_cpp.llama_model_quantize(str(in_path).encode(), str(tmp).encode(), params)
        if status != 0:
            raise BuildError(f"llama.cpp could not quantize {in_path} to {quant_type} (status {status}); "
                             "its messages above say why")
