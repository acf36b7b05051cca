"""Architecture facts, keyed by transformers' model type — the one place llmquant learns them.

Everything that touches model structure asks here instead of assuming a Llama:
- which norm feeds which input projections (SmoothQuant / AWQ fold their scales into it);
- whether an MLP's down projection input is linear in its up projection (the up -> down folding);
- extra norm -> projection pairs inside attention (DeepSeek's MLA);
- how MoE experts are named in the checkpoint (Mixtral: `block_sparse_moe.experts.N.w1`, Qwen /
  DeepSeek: `mlp.experts.N.gate_proj`) — transformers 5 fuses them into 3-D parameters in memory,
  llmquant splits them back into one Linear per expert projection (`experts.py`) and writes them
  under the checkpoint's names (`layout.py`);
- which modules are routers (kept in full precision by default: vLLM reads them unquantized, and a
  rounding error in a router changes which experts run).
A model type that is not listed gets `DEFAULT`, whose facts hold for the Llama family; every
norm -> projection folding is also checked on real activations before it is applied
(`llmquant/quant/algorithms/smoothquant.py`), so an unlisted architecture is skipped, never mis-smoothed.
"""

from __future__ import annotations

from dataclasses import dataclass

# Input projections of attention, relative to a decoder layer (standard, fused Phi-3, DeepSeek MLA).
ATTENTION_INPUTS = r"self_attn\.(q_proj|k_proj|v_proj|qkv_proj|q_a_proj|kv_a_proj_with_mqa)"
# Modules holding a router's weight: kept in full precision, but scaled with their input norm.
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")
ROUTER_PARENTS = ("mlp", "block_sparse_moe", "feed_forward", "moe")  # the MoE blocks that hold them
ROUTER_NOTE = "router, default (routers stay in full precision: vLLM reads them so, and routing is sensitive)"


@dataclass(frozen=True)
class ExpertNames:
    """Checkpoint names of one expert's projections, and module-path renames between transformers'
    in-memory model and the checkpoint (applied to whole tensor names, in memory -> checkpoint)."""

    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    renames: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ArchSpec:
    # The norm whose output every attention input projection reads (None: post-norm models).
    attention_norm: str | None = "input_layernorm"
    # The norm whose output the MLP (or MoE block: router, experts, shared experts) reads.
    mlp_norm: str | None = "post_attention_layernorm"
    # (norm, projection) pairs inside attention, relative to the decoder layer.
    attention_pairs: tuple[tuple[str, str], ...] = ()
    # True when the down projection's input is act(gate) * up: dividing up's output rows by s
    # and multiplying down's columns by s is exact. False for clamped or shifted gates (gpt-oss).
    up_feeds_down_linearly: bool = True
    experts: ExpertNames = ExpertNames()
    # Why the checkpoint layout differs from transformers' own save_pretrained, when it does.
    layout_note: str | None = None


DEFAULT = ArchSpec()
_MIXTRAL_EXPERTS = ExpertNames(gate="w1", up="w3", down="w2", renames=((".mlp.", ".block_sparse_moe."),))
_MLA_PAIRS = (("self_attn.q_a_layernorm", "self_attn.q_b_proj"), ("self_attn.kv_a_layernorm", "self_attn.kv_b_proj"))

SPECS: dict[str, ArchSpec] = {
    # Gemma: the MLP reads pre_feedforward_layernorm; post_attention_layernorm normalizes the
    # attention output before the residual add. Its (1 + w) norms do not scale with w, which the
    # folding check reports.
    "gemma2": ArchSpec(mlp_norm="pre_feedforward_layernorm"),
    "gemma3_text": ArchSpec(mlp_norm="pre_feedforward_layernorm"),
    "gemma3": ArchSpec(mlp_norm="pre_feedforward_layernorm"),
    # OLMo 2 normalizes the outputs of attention and MLP: no norm reads into a projection.
    "olmo2": ArchSpec(attention_norm=None, mlp_norm=None),
    "olmo3": ArchSpec(attention_norm=None, mlp_norm=None),
    "mixtral": ArchSpec(experts=_MIXTRAL_EXPERTS),
    "minimax": ArchSpec(experts=_MIXTRAL_EXPERTS),
    "deepseek_v2": ArchSpec(attention_pairs=_MLA_PAIRS),
    "deepseek_v3": ArchSpec(attention_pairs=_MLA_PAIRS),
    # gpt-oss: down reads (clamp(up) + 1) * glu(gate), not linear in up. Its bf16 checkpoints store
    # experts fused ([E, hidden, 2 * inter], gate/up interleaved); quantized ones store one Linear
    # per expert projection, as llm-compressor writes them.
    "gpt_oss": ArchSpec(up_feeds_down_linearly=False,
                        layout_note="quantized experts are stored per expert (mlp.experts.N.gate_proj / up_proj / "
                                    "down_proj, gate and up de-interleaved), the layout llm-compressor writes for "
                                    "quantized gpt-oss; the bf16 source stores them fused"),
}


def spec_for(model_type: str | None) -> ArchSpec:
    return SPECS.get(model_type or "", DEFAULT)


def model_spec(model) -> ArchSpec:
    """The spec of a transformers model (its config's model_type)."""
    return spec_for(getattr(getattr(model, "config", None), "model_type", None))


def is_router(name: str) -> bool:
    """A module name that holds a MoE router's weight (`mlp.gate`, `mlp.router`, `shared_expert_gate`)."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] in ROUTER_NAMES and parts[-2] in ROUTER_PARENTS


def to_checkpoint_name(name: str, spec: ArchSpec) -> str:
    """A module or tensor name as the checkpoint spells it (Mixtral: `.mlp.` -> `.block_sparse_moe.`)."""
    for memory, checkpoint in spec.experts.renames:
        name = name.replace(memory, checkpoint)
    return name


def from_checkpoint_name(name: str, spec: ArchSpec) -> str:
    for memory, checkpoint in spec.experts.renames:
        name = name.replace(checkpoint, memory)
    return name
