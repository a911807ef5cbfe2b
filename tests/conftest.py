import os

import pytest
from helpers import TINY_ARCHS, make_tiny_model, save_smollm_tokenizer


# The cores this process may use, before any worker narrows its own (macOS has no affinity call)
CORES = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # "gw0", "gw1", … under pytest-xdist; None without -n


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own, which reads the group marks into the test ids
def pytest_collection_modifyitems(items):
    """Under pytest-xdist (`-n 2 --dist loadgroup`, as CI runs), every test of the default spec's build
    goes to one worker, so that build (about six minutes) is made once, not once per worker. They come
    first: the longest chain of the run starts at once, and the other worker takes the rest meanwhile.
    The tests of one family's import round trip (a module fixture, half a minute to make) share a
    worker too, so it is made once per family, not once per worker and again whenever they interleave."""
    for item in items:
        if "default_build" in item.fixturenames:
            item.add_marker(pytest.mark.xdist_group(DEFAULT_BUILD))
        elif "matrix_build" in item.fixturenames:  # one 2x2 matrix build for its tests
            item.add_marker(pytest.mark.xdist_group("matrix"))
        elif "cluster" in item.fixturenames:  # one Ray cluster (two `ray start` nodes) for its tests
            item.add_marker(pytest.mark.xdist_group("ray"))
        elif "round_trip" in item.fixturenames:
            item.add_marker(pytest.mark.xdist_group(f"import-{item.callspec.params['round_trip']}"))
    items.sort(key=lambda item: not _builds_the_default_spec(item))  # stable: otherwise as collected


DEFAULT_BUILD = "default-build"


def _builds_the_default_spec(item) -> bool:
    group = item.get_closest_marker("xdist_group")
    return group is not None and group.args[0] == DEFAULT_BUILD


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Under pytest-xdist each worker runs its tests on a core of its own, so their builds take one
    thread each (modelmake's threads = 0 follows the CPU affinity): llama.cpp's and torch's threads spin
    while they wait, and two 2-thread builds on 2 cores run 4x slower each, not 2x. The default spec's
    tests take every core: its committed lock was trained with them (threads are a fact of training)."""
    if WORKER is None or CORES is None:
        return
    own_core = [CORES[int(WORKER.removeprefix("gw")) % len(CORES)]]
    os.sched_setaffinity(0, CORES if _builds_the_default_spec(item) else own_core)


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
def tiny_qwen25_vl(tmp_path_factory, smollm_tokenizer):
    from helpers import make_tiny_qwen25_vl

    return make_tiny_qwen25_vl(tmp_path_factory.mktemp("tiny-qwen25-vl"), smollm_tokenizer)


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
