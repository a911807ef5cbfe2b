import pytest
from helpers import TINY_ARCHS, make_tiny_model, save_smollm_tokenizer


@pytest.fixture(scope="session")
def smollm_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("smollm-tokenizer")
    save_smollm_tokenizer(folder)
    return folder


def _tiny_model_fixture(arch):
    @pytest.fixture(scope="session")
    def tiny_model(tmp_path_factory, smollm_tokenizer):
        return make_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch, smollm_tokenizer)

    return tiny_model


# tiny_llama, tiny_qwen2, … tiny_phi3: one session fixture per arch helpers.make_tiny_model builds,
# with SmolLM2's tokenizer (tests pick one by name with request.getfixturevalue(f"tiny_{arch}")).
for _arch in TINY_ARCHS:
    globals()[f"tiny_{_arch}"] = _tiny_model_fixture(_arch)


@pytest.fixture(scope="session")
def tiny_gemma3_vision(tmp_path_factory, smollm_tokenizer):
    from helpers import make_tiny_gemma3_vision

    return make_tiny_gemma3_vision(tmp_path_factory.mktemp("tiny-gemma3-vision"), smollm_tokenizer)


@pytest.fixture(scope="session")
def registry(tmp_path_factory):
    from helpers import Registry

    with Registry(tmp_path_factory.mktemp("registry")) as running:
        yield running


@pytest.fixture(scope="session")
def default_build(tmp_path_factory, registry):
    """The repo's own models.toml, data and models.lock, built once as a fresh clone would build them,
    sharing its action cache through a registry (push = true). A [cache] table changes no artifact,
    so this build is what CI's `doit check` compares with the committed lock (tests/test_lock.py)."""
    import shutil

    from helpers import REPO, doit

    folder = tmp_path_factory.mktemp("default-spec")
    shutil.copytree(REPO / "data", folder / "data")
    shutil.copy(REPO / "models.lock", folder / "models.lock")
    spec = folder / "models.toml"
    spec.write_text((REPO / "models.toml").read_text() + f'\n[cache]\nremote = "{registry.host}/modelmake-cache"\n'
                    'push = true\n')
    build = doit(spec)
    return {"folder": folder, "spec": spec, "ran": build.ran, "output": build.output, "cache": folder / "cache/smollm2-demo"}


@pytest.fixture(scope="session")
def published_build(default_build, registry):
    """The same spec with a registry to push to ([package] registry names it in compose.yaml and the
    README): a second cache folder that restores every task from the default build's action cache
    but the packages, which name the registry and so are built again."""
    from helpers import REPO, doit

    from stages.ground import runlog

    folder = default_build["folder"]
    spec = folder / "published.toml"
    spec.write_text((REPO / "models.toml").read_text() + f'\n[package]\nregistry = "{registry.host}/modelmake"\n'
                    '\n[cache]\ndir = "published"\nstore = "cache/.store"\n')
    doit(spec)
    built = sorted(task for task, record in runlog.read_records(folder / "published").items() if not record.get("restored"))
    return {"spec": spec, "built": built, "cache": folder / "published/smollm2-demo"}
