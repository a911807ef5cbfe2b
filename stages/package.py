"""package stage: one released variant → a folder a user can ship as is.

    package/<variant>/
      <model>.<variant>.gguf          the model (and for the adapter route, base + LoRA GGUFs)
      LICENSE, chat_template.jinja    when the spec names a license / the GGUF has a template
      oci/                            OCI image layout: a Docker Model Runner model artifact
      <model>-<variant>.oci.tar       the same layout as one deterministic tar
      Modelfile                       `ollama create NAME -f Modelfile`
      compose.yaml                    a Compose `models:` entry and a service bound to it
      README.md                       the commands that use all of the above
      SHA256SUMS, files.b3            every file above, by sha256 and blake3
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import gguf

from . import __version__, evaluate
from .formats import ggufheader, modelfile, oci
from .ground import llamacpp, registry
from .ground.atomic import atomic_dir, link_or_copy
from .ground.hashing import INDEX, HashingWriter, file_sha256, remember, tree_files, write_index
from .ground.spec import PackageSpec, Spec
from .ground.task import ModelBuild, Task

REVISION = 1
TOOLS = ("gguf", "llama-cpp-python")
DEFAULT_CONTEXT = 4096


@dataclass(frozen=True)
class Release:
    """What one package holds, as the graph decides it."""

    model: str
    variant: str  # Q4_K_M, F16, …, or "lora" for base + adapter
    gguf: Path  # the model GGUF: the merged/quantized release, or the base for the adapter route
    lora: Path | None  # the GGUF LoRA of the adapter route
    reference: str  # how Docker names it: registry/ns/model:variant, or model:variant when no registry is set
    mmproj: Path | None = None  # a vision model's projector, shipped beside every release of its text model
    chat_template: str | None = None  # the format it was trained on, where the GGUF does not embed it (adapter route)


def gguf_facts(path: Path) -> tuple[dict, str | None]:
    """(the config blob's `gguf` object, the chat template) of a GGUF file: its scalar metadata as
    strings; the chat template travels as a layer of its own."""
    header = ggufheader.read(path)
    scalars = dict(header.scalars)
    template = scalars.pop("tokenizer.chat_template", None)
    facts = {key: str(value).lower() if isinstance(value, bool) else str(value) for key, value in scalars.items()}
    facts |= {
        "architecture": facts.get("general.architecture", "unknown"),
        "parameter_count": oci.parameter_count_text(header.elements),
        "quantization": gguf.LlamaFileType(int(facts.get("general.file_type", 0))).name
        .removeprefix("MOSTLY_").replace("ALL_", ""),
    }
    return facts, template


def _readme(release: Release, files: dict[str, str], context_size: int, has_license: bool) -> str:
    name = release.reference.rsplit("/", 1)[-1]
    model_file = files["model"]
    lora, mmproj = files.get("lora"), files.get("mmproj")
    llama = f"llama-cli -m {model_file}" + (f" --lora {lora}" if lora else "") + " -cnv"
    if mmproj:  # llama.cpp's multimodal tools load the projector beside the text model
        llama = (f"llama-mtmd-cli -m {model_file} --mmproj {mmproj}" + (f" --lora {lora}" if lora else "")
                 + " --image picture.png -p \"Describe the image.\"\n"
                 + f"llama-server -m {model_file} --mmproj {mmproj}" + (f" --lora {lora}" if lora else ""))
    docker_local = (
        f"docker model package --gguf \"$PWD/{model_file}\"" + (f" --mmproj \"$PWD/{mmproj}\"" if mmproj else "")
        + (" --license LICENSE" if has_license else "")
        + f" --context-size {context_size} {name}\ndocker model run {name} \"Hello\""
    )
    return f"""# {release.model} · {release.variant}

Built by modelmake {__version__}. Every file here is listed in `SHA256SUMS` and `files.b3`:
check them with `sha256sum -c SHA256SUMS` (or `b3sum -c files.b3`).

## llama.cpp

```sh
{llama}
```

## Ollama

```sh
ollama create {release.model}-{release.variant.lower()} -f Modelfile
ollama run {release.model}-{release.variant.lower()}
```

## Docker Model Runner

`oci/` is the model as an OCI artifact (Docker's model-spec), `{files["tar"]}` the same as one tar.
`doit push` sends the OCI artifact to the registry in `[package]` of the spec; then


```sh
docker model pull {release.reference}
docker model run {release.reference} "Hello"
```

Without a registry, load the GGUF into the local Model Runner:

```sh
{docker_local}
```

## Compose

`compose.yaml` declares the model under `models:` and binds it to a service, which gets the
model's endpoint in `MODEL_URL` and its name in `MODEL_NAME`:

```sh
docker compose -f compose.yaml up
```
"""


def run(*, release: Release, options: PackageSpec, out_dir: Path, source_date_epoch: int,
        train_system: str | None = None) -> None:
    facts, chat_template = gguf_facts(release.gguf)
    chat_template = release.chat_template or chat_template
    for extra in (release.lora, release.mmproj):
        if extra:
            gguf_facts(extra)  # a damaged adapter or projector is refused here, not by the user's runtime
    context_size = options.context_size or min(int(facts.get(f"{facts['architecture']}.context_length",
                                                              DEFAULT_CONTEXT)), DEFAULT_CONTEXT)
    license_text = options.license.read_text(encoding="utf-8") if options.license else None
    with atomic_dir(out_dir) as tmp:
        files = {"model": release.gguf.name}
        link_or_copy(release.gguf, tmp / release.gguf.name)
        layer_files = [(tmp / release.gguf.name, oci.GGUF)]
        if release.lora:
            files["lora"] = release.lora.name
            link_or_copy(release.lora, tmp / release.lora.name)
            layer_files.append((tmp / release.lora.name, oci.GGUF_LORA))
        if release.mmproj:
            files["mmproj"] = release.mmproj.name
            link_or_copy(release.mmproj, tmp / release.mmproj.name)
            layer_files.append((tmp / release.mmproj.name, oci.MMPROJ))
        if license_text is not None:
            (tmp / "LICENSE").write_text(license_text, encoding="utf-8")
            layer_files.append((tmp / "LICENSE", oci.LICENSE))
        if chat_template:
            (tmp / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
            layer_files.append((tmp / "chat_template.jinja", oci.CHAT_TEMPLATE))

        layers = [oci.Layer(path, media, path.name, f"sha256:{file_sha256(path)}", path.stat().st_size)
                  for path, media in layer_files]
        config = oci.model_config(facts, layers, oci.created_at({"SOURCE_DATE_EPOCH": str(source_date_epoch)}))
        oci.write_layout(tmp / "oci", layers, config, tag=release.variant)
        files["tar"] = f"{release.model}-{release.variant}.oci.tar"
        with open(tmp / files["tar"], "wb") as out:
            hashed = HashingWriter(out)
            oci.write_tar(tmp / "oci", hashed, mtime=source_date_epoch)
        remember(tmp / files["tar"], hashed.blake3.hexdigest(), hashed.sha256.hexdigest())

        family = modelfile.chat_family(chat_template)
        (tmp / "Modelfile").write_text(modelfile.modelfile(
            header=f"{release.model} {release.variant}, built by modelmake {__version__}\n"
                   f"ollama create {release.model}-{release.variant.lower()} -f Modelfile",
            from_file=files["model"], adapter_file=files.get("lora"), projector_file=files.get("mmproj"),
            family=family, system=modelfile.served_system(options.system, train_system, chat_template),
            stop=modelfile.stop_words(list(llamacpp.end_of_generation(release.gguf).values()), family),
            parameters={"num_ctx": context_size} | options.parameters, license_text=license_text,
        ), encoding="utf-8")
        (tmp / "compose.yaml").write_text(modelfile.compose(
            model_key=release.model, reference=release.reference, context_size=context_size), encoding="utf-8")
        (tmp / "README.md").write_text(_readme(release, files, context_size, license_text is not None), encoding="utf-8")

        sums = "".join(f"{file_sha256(p)}  {p.relative_to(tmp).as_posix()}\n" for p in tree_files(tmp))
        (tmp / "SHA256SUMS").write_text(sums, encoding="utf-8")
        write_index(tmp)


def docker_reference(spec: Spec, model: str, variant: str) -> str:
    if spec.package.registry:
        return registry.reference(spec.package.registry, spec.package.tag, model, variant)
    return spec.package.tag.format(model=model, variant=variant)


def releases(build: ModelBuild) -> list[Release]:
    """Every quantized variant (or the converted GGUF when there are none), and with a LoRA the
    adapter route too: base GGUF + GGUF LoRA, for Ollama's ADAPTER and llama.cpp --lora."""
    model, paths = build.model, build.paths
    found = [Release(model.name, variant, paths.gguf(build.release, variant), None,
                     docker_reference(build.spec, model.name, variant), build.mmproj)
             for variant in model.quantize or [model.outtype.upper()]]
    if build.lora_gguf:
        found.append(Release(model.name, "lora", paths.base_gguf(model.outtype.upper()), build.lora_gguf,
                             docker_reference(build.spec, model.name, "lora"), build.mmproj, build.training_template))
    return found


def tasks(build: ModelBuild) -> list[Task]:
    """A package per release. A variant of a [models.matrix] has none of its own: its releases stay
    artifacts, and the one [models.select] chooses is packaged under the model's name."""
    return [] if build.model.matrix_of else release_tasks(build)


def release_tasks(build: ModelBuild) -> list[Task]:
    """A package per release, measured before it ships: a variant that misses its gate is not packaged."""
    options = build.model.package
    source_date_epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0") or "0")
    train_system = build.model.train.system if build.model.train else None
    found = []
    for release in releases(build):
        folder = build.paths.package(release.variant)
        gate = build.model.eval.gate.get(release.variant)
        found.append(Task(
            f"{release.model}-{release.variant}", f"{release.variant} → OCI artifact, Modelfile, compose.yaml", run,
            {"release": release, "options": options, "out_dir": folder, "source_date_epoch": source_date_epoch,
             "train_system": train_system},
            {"variant": release.variant, "reference": release.reference, "source_date_epoch": source_date_epoch,
             "train_system": train_system, "chat_template": release.chat_template,
             **options.model_dump(mode="json", exclude={"license"}),
             **({"gate": gate.model_dump(exclude_none=True)} if gate else {})},
            inputs=[release.gguf] + [p for p in (release.lora, release.mmproj, options.license) if p],
            outputs=[folder], targets=[folder / INDEX],
            after=[f"eval:{evaluate.task_name(build, release.variant)}", f"parity:{release.model}-{release.variant}"],
            checks=[(evaluate.check_gate, {"result_path": build.paths.eval(release.variant),
                                           "variant": release.variant, "gate": gate})] if gate else []))
    return found
