"""quantize through llama.cpp's own quantizer."""

import pytest
from gguf import GGUFReader
from helpers import leftovers, scratch_folder

from stages import convert, quantize
from stages.ground.errors import BuildError


@pytest.fixture(scope="module")
def tiny_f16(request, tiny_llama):
    out = scratch_folder(request, "q") / "tiny.F16.gguf"
    convert.run(tiny_llama, out, "f16", "tiny")
    return out


def test_thread_count_does_not_change_the_bytes(tiny_f16, tmp_path):
    quantize.run(tiny_f16, tmp_path / "one.gguf", "Q4_K_M", threads=1)
    quantize.run(tiny_f16, tmp_path / "two.gguf", "Q4_K_M", threads=2)
    assert (tmp_path / "one.gguf").read_bytes() == (tmp_path / "two.gguf").read_bytes()
    reader = GGUFReader(tmp_path / "one.gguf")
    assert reader.get_field("general.file_type").contents() == 15
    # rows of 64 are not whole 256-blocks: llama.cpp falls back to another type, as it should
    assert {t.tensor_type.name for t in reader.tensors if t.name == "blk.0.attn_q.weight"} != {"Q4_K"}


def test_llama_cpp_failure_is_a_build_error_with_its_reason(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(BuildError) as err:
        quantize.run(bad, tmp_path / "out.gguf", "Q8_0")
    assert f"llama.cpp could not quantize {bad} to Q8_0" in str(err.value)
    assert leftovers(tmp_path) == [str(bad)]
