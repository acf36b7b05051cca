"""Sparse upcycling: a Mixtral MoE built from a dense Llama checkpoint (used by quality_moe.py).

Attention, norms and embeddings are the dense model's; every decoder layer's MLP is copied into
each of E experts, and a router (`mlp.gate.weight`, [E, H]) gets small seeded random weights so
that tokens spread across experts. Mixtral renormalizes the top-k routing weights to sum to 1
and every expert is the original MLP, so the MoE computes the dense model's function (up to
float rounding) while routing tokens as a real MoE does. It is *not* a pretrained MoE: its
experts are identical, so it tests the MoE code paths (routing, per-expert calibration and
quantization, the checkpoint's per-expert layout), not what training makes experts learn.

    from moe_upcycle import upcycle
    info = upcycle(dense_dir, out_dir, num_experts=4, top_k=2, seed=0)

Router centering (default): the router's input (the post-attention RMSNorm output) has a large
component shared by all tokens (its mean is 45-85% of a token's norm on the demo model), so a
plain random router mostly scores that shared direction and sends nearly every token to the
same experts (last layer: two experts get 97% of the assignments, one 0.5%). Trained MoEs are
kept balanced by a load-balancing loss; to stand in for that, each random router has the mean
direction of its input, measured on calibration windows (never the evaluation split), projected
out, so it ranks experts by what differs between tokens.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

# Llama config keys with no Mixtral counterpart, and the value under which dropping them changes
# nothing (Mixtral attention and experts have no biases; pretraining_tp only mattered for training).
_DROPPED_LLAMA_KEYS = {"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}
# Keys that name the architecture or the file's history, not the function computed.
_IDENTITY_KEYS = {"model_type", "architectures", "transformers_version", "_name_or_path", "_model_name_or_path",
                  "dtype", "torch_dtype", "output_attentions", "output_hidden_states", "return_dict"}
UPCYCLE_JSON = "upcycling.json"


def mixtral_config(dense_config, *, num_experts: int, top_k: int):
    """A MixtralConfig carrying every setting of `dense_config` (a LlamaConfig) plus the MoE's."""
    from transformers import MixtralConfig

    if dense_config.model_type != "llama":
        raise ValueError(f"upcycling expects a llama model, got {dense_config.model_type!r}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in 1..num_experts ({num_experts}), got {top_k}")
    d = dense_config.to_dict()
    for key, neutral in _DROPPED_LLAMA_KEYS.items():
        if d.get(key, neutral) != neutral:
            raise ValueError(f"the dense model has {key}={d[key]!r}; Mixtral has no such option, so the "
                             "upcycled model would compute a different function")
    kwargs = {k: v for k, v in d.items() if k not in _DROPPED_LLAMA_KEYS and k not in _IDENTITY_KEYS}
    kwargs.update(num_local_experts=num_experts, num_experts_per_tok=top_k, sliding_window=None,
                  router_jitter_noise=0.0, output_router_logits=False)
    cfg = MixtralConfig(**kwargs)
    cfg.dtype = dense_config.dtype
    check_config(dense_config, cfg)
    return cfg


def check_config(dense_config, moe_config) -> None:
    """Raise unless `moe_config` keeps everything the dense config sets that shapes the function."""
    d, m = dense_config.to_dict(), moe_config.to_dict()
    wrong = {k: (v, m.get(k, "<missing>")) for k, v in d.items()
             if k not in _DROPPED_LLAMA_KEYS and k not in _IDENTITY_KEYS and m.get(k, "<missing>") != v}
    # Read through the attributes the modeling code reads, not just the dicts.
    checks = {
        "rope theta": (dense_config.rope_parameters["rope_theta"], moe_config.rope_parameters["rope_theta"]),
        "rope type": (dense_config.rope_parameters["rope_type"], moe_config.rope_parameters["rope_type"]),
        "rms_norm_eps": (dense_config.rms_norm_eps, moe_config.rms_norm_eps),
        "head_dim": (dense_config.head_dim, moe_config.head_dim),
        "tie_word_embeddings": (dense_config.tie_word_embeddings, moe_config.tie_word_embeddings),
        "bos_token_id": (dense_config.bos_token_id, moe_config.bos_token_id),
        "eos_token_id": (dense_config.eos_token_id, moe_config.eos_token_id),
        "pad_token_id": (dense_config.pad_token_id, moe_config.pad_token_id),
        "sliding_window": (None, moe_config.sliding_window),
        "max_position_embeddings": (dense_config.max_position_embeddings, moe_config.max_position_embeddings),
    }
    wrong.update({k: v for k, v in checks.items() if v[0] != v[1]})
    if wrong:
        raise AssertionError("the MoE config differs from the dense one: "
                             + ", ".join(f"{k}: dense {a!r} vs MoE {b!r}" for k, (a, b) in wrong.items()))


@torch.no_grad()
def upcycle(dense_dir: Path, out_dir: Path, *, num_experts: int = 4, top_k: int = 2, seed: int = 0,
            router_std: float = 0.02, center_on: torch.Tensor | None = None) -> dict:
    """Build the upcycled MixtralForCausalLM from `dense_dir`, save it (with the tokenizer) to
    `out_dir` in the dense checkpoint's dtype, check the saved files, and return a description.

    center_on: token ids (B, T) on which to measure the mean router input of every layer and
    project it out of the random router (see the module docstring); None: plain random routers."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, MixtralForCausalLM

    dense_config = AutoConfig.from_pretrained(dense_dir)
    storage = dense_config.dtype if isinstance(dense_config.dtype, torch.dtype) else getattr(
        torch, str(dense_config.dtype or "float32"))
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=storage)
    cfg = mixtral_config(dense.config, num_experts=num_experts, top_k=top_k)
    moe = MixtralForCausalLM._from_config(cfg, dtype=storage)
    means = mlp_input_means(dense, center_on) if center_on is not None else None  # (layers, H)

    src = dense.state_dict()
    dst = moe.state_dict()
    gen = torch.Generator().manual_seed(seed)
    copied, expected = set(), set(dst)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}.mlp."
        gate, up, down = (src[p + n + ".weight"] for n in ("gate_proj", "up_proj", "down_proj"))  # (I,H) (I,H) (H,I)
        experts = moe.model.layers[i].mlp.experts
        experts.gate_up_proj.copy_(torch.cat([gate, up], dim=0).expand(num_experts, -1, -1))  # (E, 2I, H)
        experts.down_proj.copy_(down.expand(num_experts, -1, -1))  # (E, H, I)
        router = torch.randn(num_experts, cfg.hidden_size, generator=gen) * router_std  # (E, H)
        if means is not None:
            mu = means[i] / means[i].norm()  # (H,)
            router -= (router @ mu)[:, None] * mu[None, :]
        moe.model.layers[i].mlp.gate.weight.copy_(router.to(storage))
        copied |= {p + "experts.gate_up_proj", p + "experts.down_proj", p + "gate.weight"}
        for n in ("gate_proj", "up_proj", "down_proj"):
            src.pop(p + n + ".weight")
    for name, tensor in src.items():  # attention, norms, embeddings (and a tied lm_head)
        if name not in dst:
            raise AssertionError(f"dense tensor {name} has no place in the MoE")
        dst[name].copy_(tensor)
        copied.add(name)
    if copied != expected:
        raise AssertionError(f"MoE tensors left uninitialized: {sorted(expected - copied)[:5]}")
    if cfg.tie_word_embeddings and moe.lm_head.weight.data_ptr() != moe.model.embed_tokens.weight.data_ptr():
        raise AssertionError("lm_head is not tied to the embeddings in the MoE")

    out_dir = Path(out_dir)
    moe.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(dense_dir).save_pretrained(out_dir)
    saved = check_saved(out_dir, dense, num_experts)
    centering = (f", mean router input of {center_on.shape[0]} x {center_on.shape[1]} calibration tokens "
                 "projected out" if center_on is not None else "")
    info = {"source": str(dense_dir), "architecture": "MixtralForCausalLM (sparse upcycling of the dense model)",
            "num_experts": num_experts, "top_k": top_k,
            "router_init": f"normal(0, {router_std}), seed {seed}{centering}",
            "storage_dtype": str(storage).removeprefix("torch."),
            "parameters": sum(t.numel() for t in moe.parameters()),
            "expert_parameters": sum(t.numel() for n, t in moe.named_parameters() if ".experts." in n),
            "dense_parameters": sum(t.numel() for t in dense.parameters()),
            "embedding_parameters": moe.model.embed_tokens.weight.numel(), **saved}
    (out_dir / UPCYCLE_JSON).write_text(json.dumps(info, indent=2) + "\n")
    return info


@torch.no_grad()
def mlp_input_means(dense, ids: torch.Tensor) -> torch.Tensor:
    """(layers, H): the mean over `ids` (B, T) of each decoder layer's MLP input, in float32."""
    dense = copy.deepcopy(dense).float()  # the caller's model keeps its storage dtype
    sums = []

    def hook(module, args):
        sums.append(args[0].reshape(-1, args[0].shape[-1]).double().mean(0))

    handles = [layer.mlp.register_forward_pre_hook(hook) for layer in dense.model.layers]
    try:
        for row in ids:
            dense(input_ids=row[None])
    finally:
        for h in handles:
            h.remove()
    n = len(dense.model.layers)
    return torch.stack(sums).reshape(len(ids), n, -1).mean(0).float()


def check_saved(out_dir: Path, dense, num_experts: int) -> dict:
    """The saved folder: Hub per-expert layout, experts bit-equal to the dense MLPs, config round trip."""
    from safetensors import safe_open
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(out_dir)
    check_config(dense.config, cfg)
    if cfg.model_type != "mixtral" or cfg.num_local_experts != num_experts:
        raise AssertionError(f"saved config is {cfg.model_type} with {cfg.num_local_experts} experts")
    tensors = {}
    for f in sorted(out_dir.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                tensors[k] = (f, k)

    def read(name):
        f, k = tensors[name]
        with safe_open(f, "pt") as st:
            return st.get_tensor(k)

    if any(".experts.gate_up_proj" in k or ".mlp." in k for k in tensors):
        raise AssertionError("the saved checkpoint holds fused experts, not the Hub per-expert layout")
    sd = dense.state_dict()
    for i in (0, len(dense.model.layers) - 1):
        for e in range(num_experts):
            p = f"model.layers.{i}.block_sparse_moe.experts.{e}."
            for w, n in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                if not torch.equal(read(p + w + ".weight"), sd[f"model.layers.{i}.mlp.{n}.weight"]):
                    raise AssertionError(f"{p}{w}.weight is not the dense {n}")
    names = sorted(k for k in tensors if ".experts." in k)
    return {"checkpoint_tensors": len(tensors), "expert_tensor_example": names[0] if names else None,
            "checkpoint_mb": sum(p.stat().st_size for p in out_dir.glob("*.safetensors")) / 1e6}


@torch.no_grad()
def routing_spread(model, ids: torch.Tensor) -> dict:
    """Share of top-k assignments each expert receives on `ids` (B, T), summed over layers, and the
    smallest share any expert gets in any layer: shows that tokens really spread across experts."""
    layers = [layer.mlp for layer in model.model.layers]
    counts = []

    def hook(module, args, output):
        _, _, indices = output  # (tokens, top_k)
        counts.append(torch.bincount(indices.flatten(), minlength=module.num_experts))

    handles = [m.gate.register_forward_hook(hook) for m in layers]
    try:
        model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    per_layer = torch.stack(counts).double()  # (layers, E)
    shares = per_layer / per_layer.sum(dim=1, keepdim=True)
    total = per_layer.sum(0) / per_layer.sum()
    return {"tokens": int(ids.numel()), "share_per_expert": [round(float(s), 4) for s in total],
            "min_share_any_layer": round(float(shares.min()), 4),
            "max_share_any_layer": round(float(shares.max()), 4)}
