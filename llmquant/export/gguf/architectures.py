"""What llama.cpp needs to know about a model family, besides its quantized blocks.

One `GGUFArchitecture` per transformers model type: the GGUF architecture string, the hyperparameter
keys, the tensor names llama.cpp looks up, and the few layout or value changes llama.cpp expects
relative to a transformers checkpoint. The GGUF writer (`writer.py`) calls, per checkpoint tensor:

    arch = gguf_architecture(config)
    arch.write_hparams(writer)
    for hf_name, tensor in checkpoint:
        if arch.skips(hf_name): continue
        name = arch.tensor_name(hf_name)            # raises on a name llama.cpp would not load
        order = arch.row_order(hf_name, rows)       # Llama q/k: rows permuted (also on packed rows)
        tensor = arch.float_transform(hf_name, t)   # Gemma norms: w -> 1 + w (float tensors only)
    for name, tensor in arch.extra_tensors().items(): ...   # rope factors llama.cpp reads as tensors

The facts mirror llama.cpp's own converter (convert_hf_to_gguf.py / conversion/*.py) and the model
loaders in llama.cpp's src/models/*.cpp; each is tested by writing a float GGUF of a tiny model and
comparing logits after loading it back (tests/llmquant/export/test_gguf_metadata.py).
"""

from __future__ import annotations

import logging

import torch

from llmquant.errors import UnsupportedArchitectureError
from llmquant.export.gguf import hparams as hp

logger = logging.getLogger(__name__)

# Config attributes that count routed experts in the families transformers ships.
_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


class GGUFArchitecture:
    """The Llama family's facts; subclasses override what their family does differently."""

    name = "llama"             # general.architecture, and the prefix of the hparam keys
    # llama.cpp's LLM_ARCH_LLAMA applies rope to interleaved pairs (x0, x1), (x2, x3), ... while
    # transformers rotates halves (x_i, x_{i+d/2}); the q/k output rows are reordered to match.
    # Every other family here uses llama.cpp's NEOX rope, which is the halves layout.
    permute_qk = False
    # Gemma's RMSNorm multiplies by (1 + w) and checkpoints store w; llama.cpp multiplies by w.
    norm_offset = 0.0
    activation = ("silu",)     # the MLP activation llama.cpp's graph for this family hard-codes
    # Rope scalings whose llama.cpp counterpart we write. llama3's per-frequency factors are a
    # tensor only the Llama graph reads; Phi-3's longrope (factor tensors) is not written yet.
    rope_types = ("default", "linear", "yarn")

    def __init__(self, config):
        from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

        self.config = config
        arch = next(a for a, n in MODEL_ARCH_NAMES.items() if n == self.name)
        # gguf-py's table of HF -> GGUF names, limited to the tensors llama.cpp loads for this arch.
        self._names = get_tensor_name_map(arch, config.num_hidden_layers)
        self.check_config()

    # --- configuration -------------------------------------------------------------------------
    def check_config(self) -> None:
        """Refuse configs whose behaviour llama.cpp's graph for this family would not reproduce."""
        act = getattr(self.config, "hidden_act", None) or getattr(self.config, "hidden_activation", None)
        if act not in self.activation:
            raise UnsupportedArchitectureError(
                f"{self.config.model_type} with activation {act!r} cannot be exported to GGUF: llama.cpp's "
                f"{self.name} graph computes {' / '.join(self.activation)}.")
        rope_type = hp.rope_settings(self.config)["rope_type"]
        if rope_type not in self.rope_types:
            raise UnsupportedArchitectureError(
                f"{self.config.model_type} with rope type {rope_type!r} cannot be exported to GGUF: llama.cpp's "
                f"{self.name} graph supports rope types {', '.join(self.rope_types)}.")

    def write_hparams(self, writer) -> None:
        """Architecture keys (context, widths, heads, rope, norm eps, vocab size). Not general.file_type."""
        hp.write_common(writer, self.config)

    # --- tensors -------------------------------------------------------------------------------
    def skips(self, hf_name: str) -> bool:
        """Checkpoint tensors llama.cpp does not want: rope caches it recomputes, and the output
        projection of tied models (llama.cpp reuses token_embd when output.weight is absent)."""
        if hf_name.endswith("rotary_emb.inv_freq"):
            return True
        return hf_name == "lm_head.weight" and bool(getattr(self.config, "tie_word_embeddings", False))

    def tensor_name(self, hf_name: str) -> str:
        name = self._names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UnsupportedArchitectureError(
                f"checkpoint tensor {hf_name!r} has no llama.cpp name in GGUF architecture {self.name!r} "
                f"(model type {self.config.model_type!r}); refusing to drop it silently.")
        return name

    def row_order(self, hf_name: str, rows: int) -> torch.Tensor | None:
        """Indices `order` with llama.cpp's tensor = hf_tensor[order], or None to keep the order.

        A row permutation (not a general transform) so that it applies equally to float rows and to
        already quantized rows: blocks run along the input dimension, so moving whole rows is exact.
        Biases of q/k (1-D) follow their rows.
        """
        if not self.permute_qk:
            return None
        if hf_name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            heads = self.config.num_attention_heads
        elif hf_name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            heads = getattr(self.config, "num_key_value_heads", None) or self.config.num_attention_heads
        else:
            return None
        if rows % (2 * heads):
            raise UnsupportedArchitectureError(f"{hf_name}: {rows} rows do not split into {heads} heads of even width.")
        # Per head, rows are [first half | second half]; llama.cpp wants them interleaved
        # (h0, h_{d/2}, h1, h_{d/2+1}, ...) — convert_hf_to_gguf's LlamaModel.permute.
        return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)

    def float_transform(self, hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Value changes llama.cpp needs on an unquantized tensor (identity for most families)."""
        if self.norm_offset and hf_name.endswith("norm.weight"):
            return tensor.float() + self.norm_offset
        return tensor

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """Float tensors llama.cpp reads that are not in the checkpoint (GGUF name -> tensor)."""
        if hp.rope_settings(self.config)["rope_type"] == "llama3":
            return {"rope_freqs.weight": hp.llama3_rope_factors(self.config)}
        return {}


class LlamaArchitecture(GGUFArchitecture):
    name = "llama"
    permute_qk = True
    rope_types = GGUFArchitecture.rope_types + ("llama3",)

    def write_hparams(self, writer) -> None:
        super().write_hparams(writer)
        writer.add_rope_dimension_count(hp.rope_dimension_count(self.config))


class MistralArchitecture(LlamaArchitecture):
    """llama.cpp runs Mistral as a Llama (its converter does the same, for MistralForCausalLM too).

    Its graph has no sliding window: contexts longer than `sliding_window` attend further back
    than transformers' Mistral would. Mistral v0.2+ sets no window; v0.1's is 4096."""

    def check_config(self) -> None:
        super().check_config()
        window = getattr(self.config, "sliding_window", None)
        if window and window < self.config.max_position_embeddings:
            logger.warning("llama.cpp ignores Mistral's sliding window (%d tokens): beyond it, its attention "
                           "differs from transformers'.", window)


class Qwen2Architecture(GGUFArchitecture):
    name = "qwen2"

    def check_config(self) -> None:
        super().check_config()
        if getattr(self.config, "use_sliding_window", False):
            raise UnsupportedArchitectureError(
                f"{self.config.model_type} with use_sliding_window=True cannot be exported to GGUF: llama.cpp's "
                f"{self.name} graph has no sliding-window attention.")


class Qwen3Architecture(Qwen2Architecture):
    name = "qwen3"   # Qwen2 plus per-head RMSNorm on q and k (attn_q_norm / attn_k_norm)


class _GemmaArchitecture(GGUFArchitecture):
    """Gemma 2 / 3: (1 + w) norms, tied embeddings, GELU-tanh MLP, sliding-window layers."""

    norm_offset = 1.0
    activation = ("gelu_pytorch_tanh", "gelu_tanh")
    # llama.cpp reads no query scale: it uses 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the
    # one model size (by layer count) whose checkpoints say so (Gemma 2 27B: 46, Gemma 3 27B: 62).
    hidden_scaled_layers = 0

    def check_config(self) -> None:
        super().check_config()
        c = self.config
        if not getattr(c, "tie_word_embeddings", True):
            raise UnsupportedArchitectureError(
                f"{c.model_type} with untied embeddings cannot be exported: llama.cpp's {self.name} graph "
                "always uses token_embd as the output projection.")
        expected = c.hidden_size // c.num_attention_heads if c.num_hidden_layers == self.hidden_scaled_layers \
            else hp.head_dim(c)
        if getattr(c, "query_pre_attn_scalar", expected) != expected:
            raise UnsupportedArchitectureError(
                f"{c.model_type} with query_pre_attn_scalar={c.query_pre_attn_scalar} cannot be exported to GGUF: "
                f"llama.cpp scales queries by 1/sqrt({expected}) for a {c.num_hidden_layers}-layer {self.name}.")

    def skips(self, hf_name: str) -> bool:
        return hf_name == "lm_head.weight" or super().skips(hf_name)

    def write_hparams(self, writer) -> None:
        super().write_hparams(writer)
        c = self.config
        if getattr(c, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(float(c.final_logit_softcapping))
        layer_types = getattr(c, "layer_types", None) or []
        if "sliding_attention" in layer_types:
            writer.add_sliding_window(int(c.sliding_window))
            # The exact per-layer pattern, not llama.cpp's default period (2 for Gemma 2, 6 for Gemma 3),
            # so that configs with other patterns (or fewer layers than a period) stay right.
            writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])


class Gemma2Architecture(_GemmaArchitecture):
    name = "gemma2"
    hidden_scaled_layers = 46

    def write_hparams(self, writer) -> None:
        super().write_hparams(writer)
        if getattr(self.config, "attn_logit_softcapping", None):
            writer.add_attn_logit_softcapping(float(self.config.attn_logit_softcapping))


class Gemma3Architecture(_GemmaArchitecture):
    name = "gemma3"
    hidden_scaled_layers = 62

    def check_config(self) -> None:
        super().check_config()
        if getattr(self.config, "attn_logit_softcapping", None):
            raise UnsupportedArchitectureError("gemma3 with attn_logit_softcapping: llama.cpp's gemma3 graph has none.")
        local = hp.rope_settings(self.config, "sliding_attention")
        if local["rope_type"] != "default":
            # llama.cpp scales rope only on full-attention layers (freq_scale_swa is 1).
            raise UnsupportedArchitectureError(
                f"gemma3 with rope type {local['rope_type']!r} on sliding layers cannot be exported to GGUF.")

    def write_hparams(self, writer) -> None:
        super().write_hparams(writer)
        # Sliding layers rotate with their own base (10k on Gemma 3, vs 1M on full-attention layers).
        writer.add_rope_freq_base_swa(float(hp.rope_settings(self.config, "sliding_attention")["rope_theta"]))


class Phi3Architecture(GGUFArchitecture):
    """Phi-3: fused qkv_proj (attn_qkv) and gate_up_proj (ffn_up, gate rows first), as llama.cpp reads them."""

    name = "phi3"

    def check_config(self) -> None:
        super().check_config()
        c = self.config
        if hp.head_dim(c) * c.num_attention_heads != c.hidden_size:
            raise UnsupportedArchitectureError(
                "phi3 with head_dim * heads != hidden_size: llama.cpp's phi3 graph assumes they are equal.")

    def write_hparams(self, writer) -> None:
        super().write_hparams(writer)
        c = self.config
        writer.add_rope_dimension_count(hp.rope_dimension_count(c))
        original = getattr(c, "original_max_position_embeddings", None)
        if original:
            writer.add_rope_scaling_orig_ctx_len(int(original))
        # As llama.cpp's converter: 0 means no window (its way of telling Phi-4 from Phi-3).
        writer.add_sliding_window(int(getattr(c, "sliding_window", None) or 0))


class Olmo2Architecture(GGUFArchitecture):
    """OLMo 2: norms after attention and MLP (post_attention / post_feedforward), q/k RMSNorm over
    the whole projection; no input norms."""

    name = "olmo2"


_ARCHITECTURES: dict[str, type[GGUFArchitecture]] = {
    "llama": LlamaArchitecture,
    "mistral": MistralArchitecture,
    "qwen2": Qwen2Architecture,
    "qwen3": Qwen3Architecture,
    "gemma2": Gemma2Architecture,
    "gemma3_text": Gemma3Architecture,
    "phi3": Phi3Architecture,
    "olmo2": Olmo2Architecture,
}


def register(model_type: str, cls: type[GGUFArchitecture]) -> None:
    _ARCHITECTURES[model_type] = cls


def supported_model_types() -> list[str]:
    return sorted(_ARCHITECTURES)


def gguf_architecture(config) -> GGUFArchitecture:
    """The GGUF facts for a transformers config; raises UnsupportedArchitectureError for the rest."""
    model_type = getattr(config, "model_type", None)
    experts = next((getattr(config, k) for k in _EXPERT_COUNT_KEYS if getattr(config, k, None)), None)
    if experts:
        raise UnsupportedArchitectureError(
            f"GGUF export of mixture-of-experts models ({model_type!r}, {experts} experts) is not supported yet. "
            f"Supported model types: {', '.join(supported_model_types())}.")
    if model_type not in _ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"GGUF export does not support model type {model_type!r}. "
            f"Supported model types: {', '.join(supported_model_types())} "
            f"(mixture-of-experts models are not supported yet).")
    return _ARCHITECTURES[model_type](config)
