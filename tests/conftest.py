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


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory, smollm_tokenizer):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-qwen3"), "qwen3", smollm_tokenizer)


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory, smollm_tokenizer):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-mistral"), "mistral", smollm_tokenizer)


@pytest.fixture(scope="session")
def tiny_gemma2(tmp_path_factory, smollm_tokenizer):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-gemma2"), "gemma2", smollm_tokenizer)


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory, smollm_tokenizer):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-gemma3"), "gemma3", smollm_tokenizer)


@pytest.fixture(scope="session")
def tiny_phi3(tmp_path_factory, smollm_tokenizer):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-phi3"), "phi3", smollm_tokenizer)


@pytest.fixture(scope="session")
def registry(tmp_path_factory):
    from helpers import Registry

    with Registry(tmp_path_factory.mktemp("registry")) as running:
        yield running


@pytest.fixture(scope="session")
def default_build(tmp_path_factory, registry):
    """The repo's own models.toml and data, built once, with a registry to push to."""
    import shutil

    from helpers import REPO, doit

    folder = tmp_path_factory.mktemp("default-spec")
    shutil.copytree(REPO / "data", folder / "data")
    spec = folder / "models.toml"
    spec.write_text((REPO / "models.toml").read_text() + f'\n[package]\nregistry = "{registry.host}/modelmake"\n')
    return {"folder": folder, "spec": spec, "ran": doit(spec).ran, "cache": folder / "cache/smollm2-demo"}
