"""merge: fold a LoRA adapter into the base weights, written as a Hugging Face folder that
convert consumes.

Streams shard by shard: W' = W + scale·B·A is computed in float32 and cast back to W's dtype,
so peak memory is about one shard plus the adapter, never the whole model. The output is
sharded like the base, with the same config, tokenizer and chat template.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from . import hf, lora
from .atomic import atomic_dir
from .hashing import INDEX, tree_files, write_index


def merged_weight(weight, a, b, scale: float):
    return (weight.float() + scale * (b.float() @ a.float())).to(weight.dtype)


def run(adapter_dir: Path, base_dir: Path, out_dir: Path, allow_pickle: bool = False) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tqdm import tqdm

    adapter = lora.load(adapter_dir, allow_pickle)
    lora.check_fits(adapter, hf.tensor_shapes(base_dir), base_dir)
    with atomic_dir(out_dir) as tmp:
        for source in tree_files(base_dir):
            if source.suffix != ".safetensors" and source.name != INDEX:
                target = tmp / source.relative_to(base_dir)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
        for shard in tqdm(hf.shards(base_dir), desc="merge", unit="shard", leave=False):
            with safe_open(shard, framework="pt") as f:
                tensors = {}
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
                    if key in adapter.pairs:
                        tensors[key] = merged_weight(tensors[key], *adapter.pairs[key], adapter.scale)
                save_file(tensors, tmp / shard.name, metadata=f.metadata())
            del tensors
        write_index(tmp)
    print(f"merged {len(adapter.pairs)} weights of {adapter_dir.name} into {out_dir}")
