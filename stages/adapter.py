"""adapter: a PEFT LoRA adapter → a GGUF LoRA that llama.cpp and Ollama (`ADAPTER`) apply on
top of the base GGUF, with no merge.

Tensors are named `<base GGUF tensor>.lora_a` (A, r × in) and `.lora_b` (B, out × r); B's rows
take the same rotary permutation as the llama q/k weight they adapt, and `adapter.lora.alpha`
is chosen so that llama.cpp's alpha/r equals PEFT's scale (rsLoRA included).

For an architecture modelmake's own converter has no plan for, llama.cpp's `convert_lora_to_gguf.py`
from the pinned source writes it (`run_pinned`): it maps names through the same model class as the
base's conversion, so the adapter fits the base GGUF that converter wrote.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from .formats import arch as arches
from .formats import ggufheader, hf, lora
from .ground import llamacpp
from .ground.atomic import atomic_file
from .ground.errors import BuildError
from .ground.task import ModelBuild, Task

REVISION = 1
TOOLS = ("gguf", "safetensors", "torch", "numpy")
OUTTYPES = {"f32": np.float32, "f16": np.float16}


def run(adapter_dir: Path, base_dir: Path, out_path: Path, outtype: str, name: str, allow_pickle: bool = False) -> None:
    adapter = lora.load(adapter_dir, allow_pickle)
    config = hf.read_config(base_dir)
    architecture = arches.from_hf_config(config, str(base_dir / "config.json"))
    adapter = lora.fit(adapter, hf.tensor_shapes(hf.headers(base_dir)), base_dir)
    names = gguf.get_tensor_name_map(architecture.gguf_arch, config["num_hidden_layers"])
    with atomic_file(out_path) as tmp:
        writer = gguf.GGUFWriter(tmp, architecture.gguf_name)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, adapter.gguf_alpha)
        writer.add_name(f"{name} LoRA")
        for hf_name, (a, b) in adapter.pairs.items():
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight",))
            if gguf_name is None:
                raise BuildError(f"{adapter_dir}: {hf_name} has no llama.cpp tensor name; "
                                 "llama.cpp LoRAs can adapt the attention and MLP projections")
            heads = architecture.rotary_heads(hf_name, config)
            b = arches.permute_rotary(b, heads) if heads else b
            writer.add_tensor(f"{gguf_name}.lora_a", a.float().numpy().astype(OUTTYPES[outtype]))
            writer.add_tensor(f"{gguf_name}.lora_b", b.float().numpy().astype(OUTTYPES[outtype]))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    print(f"{out_path.name}: {len(adapter.pairs)} adapted weights, rank {adapter.rank}, alpha {adapter.gguf_alpha:g}")


def run_pinned(adapter_dir: Path, base_dir: Path, out_path: Path, outtype: str, name: str,
               allow_pickle: bool = False) -> None:
    """llama.cpp's convert_lora_to_gguf.py from the pinned source, after the same checks `run` makes."""
    adapter = lora.load(adapter_dir, allow_pickle)
    if adapter.rslora:  # it writes lora_alpha as it is, and llama.cpp scales by alpha/r
        raise BuildError(f"{adapter_dir}: rsLoRA (use_rslora) cannot be written by llama.cpp's LoRA converter, which "
                         "scales by alpha/r; train with lora.rslora = false for this architecture")
    adapter = lora.fit(adapter, hf.tensor_shapes(hf.headers(base_dir)), base_dir)
    with atomic_file(out_path) as tmp:
        llamacpp.convert("convert_lora_to_gguf.py", [str(Path(adapter_dir).absolute()), "--base",
                         str(Path(base_dir).absolute()), "--outfile", str(tmp.absolute()), "--outtype", outtype],
                         f"write {name}'s adapter as a GGUF LoRA")
        header = ggufheader.read(tmp)
        if header.scalars.get("general.type") != "adapter":
            raise BuildError(f"llama.cpp's convert_lora_to_gguf.py wrote no LoRA for {adapter_dir} "
                             f"(general.type = {header.scalars.get('general.type')!r})")
    print(f"{out_path.name}: {len(adapter.pairs)} adapted weights, rank {adapter.rank}, alpha {adapter.alpha:g}, "
          f"by llama.cpp's convert_lora_to_gguf.py")


def tasks(build: ModelBuild) -> list[Task]:
    paths, options, lora_gguf = build.paths, build.adapter_options, build.lora_gguf
    if not paths.adapter:
        return []
    pinned = build.converter == "llama.cpp"
    return [Task(build.model.name, f"PEFT adapter → GGUF LoRA {options.outtype}"
                 + (" (llama.cpp's converter)" if pinned else ""), run_pinned if pinned else run,
                 {"adapter_dir": paths.adapter, "base_dir": paths.base, "out_path": lora_gguf,
                  "outtype": options.outtype, "name": build.model.name, "allow_pickle": options.allow_pickle},
                 {"outtype": options.outtype, "name": build.model.name} | ({"engine": "llama.cpp"} if pinned else {}),
                 inputs=paths.adapter_files() + paths.base_files(), outputs=[lora_gguf],
                 after=build.after_preflight + (["tools"] if pinned else []),
                 versions=llamacpp.converter_versions() if pinned else {})]
