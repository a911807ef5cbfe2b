import pytest

from helpers import make_tiny_model, save_smollm_tokenizer


@pytest.fixture(scope="session")
def smollm_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("smollm-tokenizer")
    save_smollm_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, smollm_tokenizer):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama", smollm_tokenizer)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory, smollm_tokenizer):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2", smollm_tokenizer)
