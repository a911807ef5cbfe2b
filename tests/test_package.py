"""package, push, pull, verify: the release end, against real tools. Go's text/template renders
each Ollama TEMPLATE, a real registry (Debian's docker-registry) takes pushes and serves pulls,
skopeo reads what was pushed, and llama.cpp runs what comes back."""

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import jinja2
import pytest
import yaml
from helpers import REPO, Registry, doit, parse_modelfile, write_spec

from stages.formats import modelfile, oci
from stages.ground import ollama
from stages.ground.errors import BuildError

GOLDEN = Path(__file__).parent / "golden/modelfile"
TWO_TURNS = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Peru?"},
]


@pytest.fixture(scope="session")
def go_render():
    """Ollama's template engine: Go's text/template, built by stages.ground.ollama as the parity check builds it."""
    binary = ollama.renderer_path()
    assert binary, "Go is needed for these tests (apt-get install golang-go)"
    return lambda template, messages: ollama.render(binary, template, messages)


def jinja_render(template: str, messages: list[dict]) -> str:
    """As transformers renders a chat template; BOS left out, since llama.cpp adds it when tokenizing."""
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = lambda message: (_ for _ in ()).throw(ValueError(message))
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, bos_token="",
                                            eos_token="</s>")


@pytest.mark.parametrize("family", modelfile.FAMILIES, ids=lambda f: f.name)
def test_template_family_matches_its_golden_files_and_renders_like_the_jinja(family, go_render):
    """Golden files per family: the Jinja chat template of a real model of it (chatml: SmolLM2's, from
    the embedded GGUF; llama3: Meta-Llama-3-Instruct; gemma: Gemma 3, text part; mistral: Mistral
    Instruct v0.3; phi3: Phi-3-mini-4k-instruct; alpaca: modelmake's own), the TEMPLATE, and the two-turn
    conversation both render to, which was read by hand against the model card's prompt format."""
    jinja = (GOLDEN / f"{family.name}.jinja").read_text()
    assert modelfile.chat_family(jinja) is family
    assert family.template == (GOLDEN / f"{family.name}.gotmpl").read_text()

    expected = (GOLDEN / f"{family.name}.conversation.txt").read_text()
    assert jinja_render(jinja, TWO_TURNS) == expected
    assert go_render(family.template, TWO_TURNS) == expected

    # Without a system message: the template's own default (ChatML) comes through the Modelfile's SYSTEM.
    plain = TWO_TURNS[1:]
    messages = ollama.messages_as_ollama_sends(plain, modelfile.default_system(jinja))
    assert go_render(family.template, messages) == jinja_render(jinja, plain)


def test_stop_words_are_the_ggufs_end_of_generation_tokens_and_the_turn_opener():
    """Never typed per family: what llama.cpp stops at (read from the GGUF), plus the marker that opens the
    next turn, so Ollama stops a model that runs past its end of turn."""
    assert modelfile.stop_words(["<|im_end|>", "<|endoftext|>"], modelfile.CHATML) == [
        "<|endoftext|>", "<|im_end|>", "<|im_start|>"]
    assert modelfile.stop_words(["<|eot_id|>", "<|end_of_text|>"], modelfile.LLAMA3) == [
        "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>"]
    assert modelfile.stop_words(["<end_of_turn>", "<eos>"], modelfile.GEMMA) == ["<end_of_turn>", "<eos>", "<start_of_turn>"]
    assert modelfile.stop_words(["</s>"], None) == ["</s>"]


def test_unknown_chat_templates_get_no_template_and_ollama_infers_one():
    llama2 = "{% for m in messages %}{{ '[INST] <<SYS>>\\n' + m['content'] + '\\n<</SYS>> [/INST]' }}{% endfor %}"
    assert modelfile.chat_family(llama2) is None
    assert modelfile.chat_family("{{ messages[0]['content'] }}") is None
    assert modelfile.chat_family(None) is None
    text = modelfile.modelfile(header="h", from_file="m.gguf", adapter_file=None, family=None, system=None,
                               stop=[], parameters={"num_ctx": 512}, license_text=None)
    assert parse_modelfile(text) == [("FROM", "./m.gguf"), ("PARAMETER", "num_ctx 512")]
    assert "# No TEMPLATE" in text


def test_modelfile_values_are_quoted_so_ollama_reads_them_back():
    system = 'Say "hi".\nThen stop.'
    text = modelfile.modelfile(header="two\nlines", from_file="m.gguf", adapter_file="a.gguf",
                               family=modelfile.CHATML, system=system, stop=["<|im_end|>", "<|im_start|>"],
                               parameters={"temperature": 0.2, "stop": ["</answer>"], "mirostat": True},
                               license_text="MIT License\n\nCopyright")
    parsed = parse_modelfile(text)
    assert ("SYSTEM", system) in parsed and ("ADAPTER", "./a.gguf") in parsed
    assert ("TEMPLATE", modelfile.CHATML.template) in parsed
    assert ("LICENSE", "MIT License\n\nCopyright") in parsed
    assert [v for c, v in parsed if c == "PARAMETER"] == [
        "stop <|im_end|>", "stop <|im_start|>", "temperature 0.2", "stop </answer>", "mirostat true"]
    with pytest.raises(BuildError, match="package.system contains three double quotes"):
        modelfile.modelfile(header="", from_file="m.gguf", adapter_file=None, family=None,
                            system='a """ b', stop=[], parameters={}, license_text=None)


def test_created_at_comes_from_source_date_epoch_never_the_clock():
    assert oci.created_at({}) == "1970-01-01T00:00:00Z"
    assert oci.created_at({"SOURCE_DATE_EPOCH": "1735689600"}) == "2025-01-01T00:00:00Z"
    assert oci.parameter_count_text(134_515_008) == "134.52 M"
    assert oci.parameter_count_text(1_100_048_384) == "1.10 B"
    assert oci.json_bytes({"b": 1, "a": "é"}) == '{"a":"é","b":1}'.encode()


# ---- the default spec, built once (conftest.default_build), and with a real registry (published_build) ----

def _manifest_of(layout: Path) -> tuple[str, dict]:
    return oci.read_layout(layout)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@pytest.mark.slow
def test_package_folders_hold_what_each_route_needs(published_build):
    assert published_build["built"] == ["manifest:smollm2-demo", "package:smollm2-demo-Q4_K_M",
                                        "package:smollm2-demo-Q8_0", "package:smollm2-demo-lora"], \
        "the registry changes the packages (and so the manifest) alone: every other task is restored"
    packages = published_build["cache"] / "package"
    assert sorted(p.name for p in packages.iterdir()) == ["Q4_K_M", "Q8_0", "lora"]
    license_text = (REPO / "data/SmolLM2-LICENSE.txt").read_text()
    for folder in packages.iterdir():
        subprocess.run(["sha256sum", "--check", "--quiet", "SHA256SUMS"], cwd=folder, check=True)
        listed = {line.split("  ", 1)[1] for line in (folder / "SHA256SUMS").read_text().splitlines()}
        on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        assert on_disk - listed == {"SHA256SUMS", "files.b3"}

        parsed = parse_modelfile((folder / "Modelfile").read_text())
        named = [value.removeprefix("./") for command, value in parsed if command in ("FROM", "ADAPTER")]
        assert all((folder / name).is_file() for name in named), "the Modelfile names files beside it"
        assert ("TEMPLATE", (GOLDEN / "chatml.gotmpl").read_text()) in parsed
        assert ("SYSTEM", "You are a helpful AI assistant named SmolLM, trained by Hugging Face") in parsed
        assert ("LICENSE", license_text.strip()) in parsed
        assert ("PARAMETER", "stop <|im_end|>") in parsed and ("PARAMETER", "num_ctx 4096") in parsed

        compose = yaml.safe_load((folder / "compose.yaml").read_text())
        reference = compose["models"]["smollm2-demo"]["model"]
        assert reference.endswith(f"/modelmake/smollm2-demo:{folder.name}")
        assert compose["models"]["smollm2-demo"]["context_size"] == 4096
        assert compose["services"]["app"]["models"]["smollm2-demo"] == {"endpoint_var": "MODEL_URL",
                                                                        "model_var": "MODEL_NAME"}
        assert f"docker model pull {reference}" in (folder / "README.md").read_text()

        digest, manifest = _manifest_of(folder / "oci")
        assert manifest["config"]["mediaType"] == oci.MODEL_CONFIG
        tar_path = folder / f"smollm2-demo-{folder.name}.oci.tar"
        raw = subprocess.run(["skopeo", "inspect", "--raw", f"oci-archive:{tar_path}"], capture_output=True,
                             check=True).stdout
        assert "sha256:" + hashlib.sha256(raw).hexdigest() == digest, "the tar is the same artifact"
        with tarfile.open(tar_path) as tar:
            members = tar.getmembers()
        assert [m.name for m in members] == sorted(m.name for m in members)
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, 0, "", "")}

    assert [v for c, v in parse_modelfile((packages / "lora/Modelfile").read_text()) if c in ("FROM", "ADAPTER")] \
        == ["./smollm2-demo.F16.gguf", "./smollm2-demo.lora.F16.gguf"]
    assert parse_modelfile((packages / "Q4_K_M/Modelfile").read_text())[0] == (
        "FROM", "./smollm2-demo-merged.Q4_K_M.gguf")
    config = json.loads(oci.blob_path(packages / "Q4_K_M/oci", _manifest_of(packages / "Q4_K_M/oci")[1][
        "config"]["digest"]).read_bytes())
    assert config["config"] | {"gguf": None} == {
        "format": "gguf", "format_version": "3", "architecture": "llama", "parameters": "134.52 M",
        "quantization": "Q4_K_M", "size": str((packages / "Q4_K_M/smollm2-demo-merged.Q4_K_M.gguf").stat().st_size),
        "gguf": None}
    assert config["config"]["gguf"]["general.name"] == "smollm2-demo-merged"
    assert config["descriptor"] == {"createdAt": "1970-01-01T00:00:00Z"}


@pytest.mark.slow
def test_push_then_pull_gives_back_the_same_bytes_and_they_run(published_build, registry, tmp_path):
    from llama_cpp import Llama

    pushed = doit(published_build["spec"], "push").output
    packages = published_build["cache"] / "package"
    question = [{"role": "user", "content": "What is the capital of Peru?"}]
    for variant in ("Q4_K_M", "Q8_0", "lora"):
        digest, _ = _manifest_of(packages / variant / "oci")
        ref = f"{registry.host}/modelmake/smollm2-demo:{variant}"
        assert f"{registry.host}/modelmake/smollm2-demo@{digest}" in pushed

        raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
                             capture_output=True, check=True).stdout
        assert "sha256:" + hashlib.sha256(raw).hexdigest() == digest
        served = json.loads(raw)
        assert served["config"]["mediaType"] == "application/vnd.docker.ai.model.config.v0.1+json"
        layer_types = [layer["mediaType"] for layer in served["layers"]]
        assert layer_types[0] == "application/vnd.docker.ai.gguf.v3"
        assert "application/vnd.docker.ai.license" in layer_types
        assert "application/vnd.docker.ai.chat.template.jinja" in layer_types
        assert ("application/vnd.docker.ai.gguf.v3.lora" in layer_types) == (variant == "lora")

        dest = tmp_path / variant
        output = doit(published_build["spec"], "pull", "--ref", ref, "--dest", str(dest)).output
        assert "every blob verified" in output
        assert _manifest_of(dest / "oci")[0] == digest
        for gguf_file in (packages / variant).glob("*.gguf"):
            assert _sha256(dest / gguf_file.name) == _sha256(gguf_file)

    merged = Llama(str(tmp_path / "Q8_0/smollm2-demo-merged.Q8_0.gguf"), n_ctx=256, verbose=False, n_threads=2)
    answer = merged.create_chat_completion(messages=question, max_tokens=16, temperature=0)
    assert answer["choices"][0]["message"]["content"].startswith("Answer: Lima")
    with_adapter = Llama(str(tmp_path / "lora/smollm2-demo.F16.gguf"), n_ctx=256, verbose=False, n_threads=2,
                         lora_path=str(tmp_path / "lora/smollm2-demo.lora.F16.gguf"))
    answer = with_adapter.create_chat_completion(messages=question, max_tokens=16, temperature=0)
    assert answer["choices"][0]["message"]["content"].startswith("Answer: Lima")

    by_digest = f"{registry.host}/modelmake/smollm2-demo@{_manifest_of(packages / 'Q4_K_M/oci')[0]}"
    doit(published_build["spec"], "pull", "--ref", by_digest, "--dest", str(tmp_path / "by-digest"))
    assert (tmp_path / "by-digest/smollm2-demo-merged.Q4_K_M.gguf").is_file()


@pytest.mark.slow
def test_a_package_rebuilt_from_scratch_is_byte_identical(default_build):
    folder = default_build["cache"] / "package/Q4_K_M"
    tar = folder / "smollm2-demo-Q4_K_M.oci.tar"
    before = (_sha256(tar), _manifest_of(folder / "oci")[0], (folder / "SHA256SUMS").read_bytes())
    shutil.rmtree(folder)
    # cache=off: the package is built again, not restored from the action cache
    assert doit(default_build["spec"], "cache=off").ran == ["package:smollm2-demo-Q4_K_M", "report"]
    assert (_sha256(tar), _manifest_of(folder / "oci")[0], (folder / "SHA256SUMS").read_bytes()) == before
    assert "smollm2-demo: " in doit(default_build["spec"], "verify").output


# ---- a tiny model: registry failures, auth, tampering, verify ----

@pytest.fixture
def tiny_workspace(tmp_path, tiny_llama):
    shutil.copytree(tiny_llama, tmp_path / "tiny")
    (tmp_path / "LICENSE").write_text("MIT License\n")

    def spec_for(registry_host: str):
        return write_spec(tmp_path, f'[package]\nregistry = "{registry_host}/tests"\n\n'
                                    '[[models]]\nname = "tiny"\nbase = "tiny"\nquantize = ["Q8_0"]\n'
                                    '[models.package]\nlicense = "LICENSE"\nsystem = "Be brief."\n')
    return tmp_path, spec_for


@pytest.mark.slow
def test_push_needs_credentials_on_a_registry_with_auth(tiny_workspace, tmp_path_factory):
    folder, spec_for = tiny_workspace
    with Registry(tmp_path_factory.mktemp("auth-registry"), users={"ci": "s3cret"}) as secured:
        spec = spec_for(secured.host)
        doit(spec)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODELMAKE_REGISTRY")}
        env |= {"HOME": str(folder), "DOCKER_CONFIG": str(folder / "no-docker-config")}
        refused = doit(spec, "push", check=False, env=env)
        assert refused.returncode != 0 and "Traceback" not in refused.output
        assert "the registry refused the credentials" in refused.output
        assert "MODELMAKE_REGISTRY_USER" in refused.output

        wrong = doit(spec, "push", check=False, env=env | {"MODELMAKE_REGISTRY_USER": "ci",
                                                            "MODELMAKE_REGISTRY_PASSWORD": "wrong"})
        assert wrong.returncode != 0 and "refused the credentials" in wrong.output

        accepted = doit(spec, "push", env=env | {"MODELMAKE_REGISTRY_USER": "ci", "MODELMAKE_REGISTRY_PASSWORD": "s3cret"})
        assert f"{secured.host}/tests/tiny@sha256:" in accepted.output

        docker_config = folder / "docker-config"  # what `docker login` leaves behind
        docker_config.mkdir()
        import base64
        (docker_config / "config.json").write_text(json.dumps(
            {"auths": {secured.host: {"auth": base64.b64encode(b"ci:s3cret").decode()}}}))
        assert "@sha256:" in doit(spec, "push", env=env | {"DOCKER_CONFIG": str(docker_config)}).output
        assert "s3cret" not in spec.read_text() and "s3cret" not in (folder / "cache/tiny/manifest.json").read_text()


@pytest.mark.slow
def test_a_registry_that_is_down_fails_clearly_after_bounded_retries(tiny_workspace):
    from helpers import _free_port

    _, spec_for = tiny_workspace
    spec = spec_for(f"127.0.0.1:{_free_port()}")
    doit(spec)
    result = doit(spec, "push", check=False)
    assert result.returncode != 0 and "Traceback" not in result.output
    assert "cannot reach the registry" in result.output and "after 3 tries" in result.output


@pytest.mark.slow
def test_pull_refuses_a_tampered_blob_and_writes_nothing(tiny_workspace, registry):
    folder, spec_for = tiny_workspace
    spec = spec_for(registry.host)
    doit(spec)
    doit(spec, "push")
    digest, manifest = _manifest_of(folder / "cache/tiny/package/Q8_0/oci")
    gguf_layer = next(layer for layer in manifest["layers"] if layer["mediaType"] == oci.GGUF)
    stored = registry.blob_data(gguf_layer["digest"])
    original = stored.read_bytes()
    try:
        damaged = bytearray(original)
        damaged[len(damaged) // 2] ^= 0x01
        stored.write_bytes(bytes(damaged))
        dest = folder / "pulled"
        result = doit(spec, "pull", "--ref", f"{registry.host}/tests/tiny:Q8_0", "--dest", str(dest), check=False)
        assert result.returncode != 0 and "Traceback" not in result.output
        assert "damaged" in result.output
        assert not dest.exists()
        assert not [p for p in folder.iterdir() if p.name.startswith(".pulled")], "no temp folder left"
    finally:
        stored.write_bytes(original)  # the session registry is shared


@pytest.mark.slow
def test_verify_names_a_changed_artifact_and_a_build_repairs_it(tiny_workspace):
    folder, spec_for = tiny_workspace
    spec = spec_for("127.0.0.1:5000")
    doit(spec)
    assert "tiny: " in doit(spec, "verify").output and "artifacts match" in doit(spec, "verify").output
    modelfile_path = folder / "cache/tiny/package/Q8_0/Modelfile"
    modelfile_path.write_text(modelfile_path.read_text().replace("Be brief.", "Be long."))
    failed = doit(spec, "verify", check=False)
    assert failed.returncode != 0 and "package/Q8_0/Modelfile: bytes differ" in failed.output
    assert doit(spec).ran == ["package:tiny-Q8_0", "report"]
    doit(spec, "verify")


def test_push_without_a_registry_says_what_to_add(tmp_path, tiny_llama):
    shutil.copytree(tiny_llama, tmp_path / "tiny")
    spec = write_spec(tmp_path, '[[models]]\nname = "tiny"\nbase = "tiny"\n')
    result = doit(spec, "push", check=False)
    assert result.returncode != 0 and "no registry to push to: add [package] registry" in result.output
    assert "Traceback" not in result.output


def test_package_spec_errors_name_the_field(tmp_path, tiny_llama):
    shutil.copytree(tiny_llama, tmp_path / "tiny")
    for body, message in [
        ('[package]\ntag = "{model}:{quant}"\n', "only {model} and {variant} can be filled in"),
        ('[package]\nregistry = "https://x.io/ns"\n', "package.registry"),
        ('[[models]]\nname = "t"\nbase = "tiny"\n[models.package]\nlicense = "NOPE"\n', "license file"),
        ('[[models]]\nname = "t"\nbase = "tiny"\n[models.package]\nparameters = {"Top P" = 1}\n',
         "not an Ollama parameter name"),
        ('[package]\nregistry = "127.0.0.1:5000/ns"\n[[models]]\nname = "Tiny"\nbase = "tiny"\n',
         "repository 'Tiny' (from [package] tag) has capitals"),
    ]:
        if not body.startswith("[[models]]"):
            body += '[[models]]\nname = "t"\nbase = "tiny"\n'
        result = doit(write_spec(tmp_path, body), command="list", check=False)
        assert result.returncode != 0 and message in result.output, result.output
        assert "Traceback" not in result.output


def test_gguf_scan_reads_what_gguf_py_reads_and_refuses_a_truncated_file(tmp_path):
    """The package reads GGUF metadata with its own header scan (gguf-py's reader takes seconds over
    a 49k-token vocabulary): the same scalars, chat template and parameter count as gguf-py."""
    import gguf
    from helpers import SMOLLM_GGUF

    from stages.formats import ggufheader
    from stages.package import gguf_facts

    facts, template = gguf_facts(SMOLLM_GGUF)
    reader = gguf.GGUFReader(SMOLLM_GGUF)
    expected = {name: field.contents() for name, field in reader.fields.items()
                if not name.startswith("GGUF.") and field.types[0] != gguf.GGUFValueType.ARRAY}
    assert template == expected.pop("tokenizer.chat_template")
    assert {name: facts[name] for name in expected} == {
        name: str(value).lower() if isinstance(value, bool) else str(value) for name, value in expected.items()}
    assert facts["parameter_count"] == oci.parameter_count_text(sum(int(t.n_elements) for t in reader.tensors))
    assert (facts["architecture"], facts["quantization"]) == ("llama", "Q4_1")
    assert ggufheader.read(SMOLLM_GGUF).data_offset == reader.data_offset  # eval's bits per weight start here

    truncated = tmp_path / "t.gguf"
    truncated.write_bytes(SMOLLM_GGUF.read_bytes()[:300_000])
    with pytest.raises(BuildError, match="t.gguf is not a readable GGUF file"):
        gguf_facts(truncated)
