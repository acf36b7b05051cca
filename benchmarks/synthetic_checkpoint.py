"""The synthetic checkpoint of benchmarks/out_of_core.py: a Llama-shaped model with random weights
(seeded, normal with std 0.02, norms ones, bf16) and the demo model's tokenizer, written tensor by
tensor in shards with `model.safetensors.index.json`, so that the writer never holds more than one
shard. The folder is cached and reused when an earlier run wrote it completely with the same
settings (a marker file written last)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

_GIB = 1024 ** 3
LAYOUT_VERSION = 1  # raise when the synthetic checkpoint's layout changes: cached folders are rewritten
MARKER = ".out_of_core_synthetic.json"  # written last: its presence means the folder is complete

# Synthetic model shapes (head_dim = hidden / heads). shard_mb: the default shard size, so that each
# size is written in several shards and the sharded loading path is the one measured.
SIZES = {
    "3b": dict(hidden=3072, intermediate=8192, layers=28, heads=24, kv_heads=8, shard_mb=2000),  # Llama-3.2-3B
    "0.5b": dict(hidden=1536, intermediate=4096, layers=16, heads=12, kv_heads=4, shard_mb=500),
    "tiny": dict(hidden=256, intermediate=512, layers=4, heads=4, kv_heads=2, shard_mb=16),
}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


# ---- the synthetic checkpoint ----------------------------------------------------------------

def synthetic_shape(args, group_size: int) -> dict:
    """The preset of --size with --layers / --hidden / --intermediate applied (heads keep head_dim)."""
    shape = dict(SIZES[args.size])
    head_dim = shape["hidden"] // shape["heads"]
    per_kv = shape["heads"] // shape["kv_heads"]
    for key in ("layers", "hidden", "intermediate"):
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    if shape["hidden"] % head_dim:
        raise SystemExit(f"--hidden {shape['hidden']} is not a multiple of the head size {head_dim} "
                         f"of --size {args.size}")
    shape["heads"] = shape["hidden"] // head_dim
    shape["kv_heads"] = max(1, shape["heads"] // per_kv)
    if args.shard_mb is not None:
        shape["shard_mb"] = args.shard_mb
    for key in ("hidden", "intermediate"):
        if shape[key] % group_size:
            raise SystemExit(f"{key} {shape[key]} is not a multiple of the group size {group_size}")
    return shape


def synthetic_config(shape: dict, demo_dir: Path) -> dict:
    """A LlamaForCausalLM config.json of this shape, with the demo tokenizer's vocabulary and ids."""
    from transformers import AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(demo_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], head_dim=shape["hidden"] // shape["heads"],
        max_position_embeddings=131072, rms_norm_eps=1e-05, rope_theta=500000.0, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, torch_dtype="bfloat16", architectures=["LlamaForCausalLM"])
    return config.to_dict()


def tensor_names(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor, in LlamaForCausalLM's state_dict order."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = config.get("head_dim") or h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    names = [("model.embed_tokens.weight", (v, h))]
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        names += [(p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                  (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q)),
                  (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                  (p + "mlp.down_proj.weight", (h, i)),
                  (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    names += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return names


def shard_plan(names: list[tuple[str, tuple[int, ...]]], shard_bytes: int) -> list[list[tuple[str, tuple]]]:
    """Tensors grouped into shards as transformers does: a new shard when the next tensor would
    overflow the current one (a tensor larger than a shard gets one of its own)."""
    shards, current, size = [], [], 0
    for name, shape in names:
        nbytes = 2 * _numel(shape)
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    if current:
        shards.append(current)
    return shards


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def ensure_synthetic(shape: dict, demo_dir: Path, cache_dir: Path, seed: int) -> tuple[Path, dict]:
    """The synthetic checkpoint folder (written, or reused from an earlier complete write) and its info."""
    from safetensors.torch import save_file

    config = synthetic_config(shape, demo_dir)
    names = tensor_names(config)
    wanted = {"layout_version": LAYOUT_VERSION, "shape": shape, "seed": seed, "demo_tokenizer": str(demo_dir),
              "parameters": sum(_numel(s) for _, s in names)}
    folder = cache_dir / (f"synthetic-llama-{shape['layers']}l-{shape['hidden']}h-{shape['intermediate']}i-"
                          f"{shape['shard_mb']}mb-seed{seed}")
    marker = folder / MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("settings") == wanted:
        print(f"reusing the synthetic checkpoint in {folder}", flush=True)
        return folder, json.loads(marker.read_text())
    if folder.exists():
        shutil.rmtree(folder)  # an incomplete write, or other settings: this cache folder is ours
    need = 2 * wanted["parameters"]
    free = shutil.disk_usage(cache_dir.parent if not cache_dir.exists() else cache_dir).free
    if free < need * 1.05:
        raise SystemExit(f"the synthetic checkpoint needs {need / _GIB:.1f} GiB, {free / _GIB:.1f} GiB free in "
                         f"{cache_dir}; choose another --cache-dir or a smaller --size")
    folder.mkdir(parents=True)
    t = time.perf_counter()
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for fname in TOKENIZER_FILES:
        if (demo_dir / fname).is_file():
            shutil.copy2(demo_dir / fname, folder / fname)
    shards = shard_plan(names, shape["shard_mb"] * 10 ** 6)
    weight_map, total, k = {}, 0, 0
    for s, members in enumerate(shards, start=1):
        fname = f"model-{s:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, tshape in members:
            k += 1
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(tshape, dtype=torch.bfloat16)
            else:  # one generator per tensor: any tensor can be regenerated alone
                g = torch.Generator().manual_seed(seed * 1_000_003 + k)
                tensors[name] = torch.empty(tshape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=g)
            weight_map[name] = fname
            total += tensors[name].numel() * tensors[name].element_size()
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        del tensors
        print(f"  wrote {fname} ({len(members)} tensors)", flush=True)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    info = {"settings": wanted, "config": {k: config[k] for k in (
                "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "tie_word_embeddings")},
            "total_size": total, "shards": len(shards), "write_seconds": time.perf_counter() - t}
    marker.write_text(json.dumps(info, indent=2) + "\n")  # last: the folder is complete
    print(f"wrote the synthetic checkpoint ({wanted['parameters'] / 1e9:.2f}B parameters, {total / _GIB:.2f} GiB, "
          f"{len(shards)} shards) in {folder} ({info['write_seconds']:.0f} s)", flush=True)
    return folder, info


def checkpoint_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))
