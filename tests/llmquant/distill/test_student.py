"""Making students: importance scores, layer dropping and width pruning keep an ordinary,
runnable, loadable transformers model, and do what they say to the weights."""

from __future__ import annotations

import pytest
import torch

from llmquant.distill.export import save_student
from llmquant.distill.student import (
    choose_layers,
    layer_importance,
    make_student,
    student_from_config,
)
from llmquant.errors import InvalidConfigError


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits.float()


def test_layer_importance_is_one_minus_cosine_of_each_layers_input_and_output(teacher, windows):
    model = teacher.model
    scores = layer_importance(model, windows[:2])
    assert len(scores) == 4 and all(0.0 < s < 2.0 for s in scores)
    # Recompute layer 2's score from hidden states: hidden_states[i] enters layer i.
    with torch.no_grad():
        hs = [model(w[None], output_hidden_states=True, use_cache=False).hidden_states for w in windows[:2]]
    cos = torch.cat([torch.nn.functional.cosine_similarity(h[2], h[3], dim=-1).reshape(-1) for h in hs])
    assert scores[2] == pytest.approx((1 - cos).mean().item(), rel=1e-4)
    assert choose_layers([0.5, 0.1, 0.9, 0.3], 2) == [0, 2]


def test_dropped_layers_student_equals_teacher_run_without_them(teacher, windows, tmp_path):
    student, plan = make_student(teacher.model, windows[:2], keep_layers=[0, 3])
    assert student.config.num_hidden_layers == 2 and plan.kept_layers == [0, 3]
    assert teacher.model.config.num_hidden_layers == 4  # the teacher is untouched
    # Same computation as the teacher with layers 1 and 2 skipped: run the teacher's own modules.
    ids = windows[2:3]
    t = teacher.model
    with torch.no_grad():
        h = t.model.embed_tokens(ids)
        pos = torch.arange(ids.shape[1])[None]
        pe = t.model.rotary_emb(h, pos)
        from transformers.masking_utils import create_causal_mask
        mask = create_causal_mask(config=t.config, inputs_embeds=h, attention_mask=None, cache=None,
                                  position_ids=pos)
        for i in (0, 3):
            h = t.model.layers[i](h, attention_mask=mask, position_ids=pos, position_embeddings=pe)
        expected = t.lm_head(t.model.norm(h)).float()
    assert torch.allclose(_logits(student, ids), expected, atol=1e-4)
    # Saved and loaded like any checkpoint, with the same logits; generation works (KV cache indices).
    from llmquant import load_model

    out = save_student(student, teacher.tokenizer, tmp_path / "s", storage_dtype=torch.float32, overwrite=False,
                       files={})
    loaded = load_model(out, dtype="float32")
    assert loaded.model.config.num_hidden_layers == 2
    assert torch.allclose(_logits(loaded.model, ids), _logits(student, ids), atol=1e-5)
    gen = loaded.model.generate(ids[:, :8], max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 12)


def test_width_pruning_at_full_size_changes_nothing_and_smaller_sizes_keep_the_largest(teacher, windows, tmp_path):
    ids = windows[3:4]
    same, _ = make_student(teacher.model, windows[:2], intermediate_size=256, num_key_value_heads=2)
    assert torch.allclose(_logits(same, ids), _logits(teacher.model, ids), atol=1e-5)

    student, plan = make_student(teacher.model, windows[:2], num_layers=3, intermediate_size=96,
                                 num_key_value_heads=1)
    cfg = student.config
    assert (cfg.num_hidden_layers, cfg.intermediate_size, cfg.num_key_value_heads, cfg.num_attention_heads,
            cfg.head_dim) == (3, 96, 1, 2, 32)
    layer = student.model.layers[0]
    assert layer.mlp.gate_proj.weight.shape == (96, 128) and layer.mlp.down_proj.weight.shape == (128, 96)
    assert layer.self_attn.q_proj.weight.shape == (64, 128) and layer.self_attn.k_proj.weight.shape == (32, 128)
    assert plan.intermediate_size == (256, 96) and plan.kv_heads == (2, 1) and len(plan.kept_layers) == 3
    # The kept neurons are rows of the teacher's gate_proj (copied, not re-initialized).
    t_gate = teacher.model.model.layers[plan.kept_layers[0]].mlp.gate_proj.weight
    match = (layer.mlp.gate_proj.weight[:, None, :] == t_gate[None]).all(-1).any(-1)
    assert match.all()
    logits = _logits(student, ids)
    assert torch.isfinite(logits).all()
    from llmquant import load_model

    out = save_student(student, teacher.tokenizer, tmp_path / "w", storage_dtype=torch.bfloat16, overwrite=False,
                       files={})
    loaded = load_model(out, dtype="float32")
    assert loaded.model.config.intermediate_size == 96
    # bf16 storage: logits agree to bf16 rounding of the weights.
    diff = (_logits(loaded.model, ids) - logits).abs().max().item()
    assert diff < 0.05 * logits.abs().max().item()


def test_invalid_requests_are_user_errors(teacher, windows):
    with pytest.raises(InvalidConfigError, match="0..3"):
        make_student(teacher.model, windows[:1], keep_layers=[0, 7])
    with pytest.raises(InvalidConfigError, match="1..2"):
        make_student(teacher.model, windows[:1], num_key_value_heads=3)
    with pytest.raises(InvalidConfigError, match="not both"):
        make_student(teacher.model, windows[:1], num_layers=2, keep_layers=[0, 1])


def test_student_from_config_uses_the_teachers_vocabulary(teacher, tmp_path):
    cfg = tmp_path / "student.yaml"
    cfg.write_text(f"model_type: llama\nhidden_size: 64\nintermediate_size: 128\nnum_hidden_layers: 2\n"
                   f"num_attention_heads: 2\nnum_key_value_heads: 1\nvocab_size: {len(teacher.tokenizer)}\n")
    model = student_from_config(cfg, teacher.tokenizer)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, len(teacher.tokenizer))
    cfg.write_text("model_type: llama\nvocab_size: 100\n")
    with pytest.raises(InvalidConfigError, match="share the tokenizer"):
        student_from_config(cfg, teacher.tokenizer)
