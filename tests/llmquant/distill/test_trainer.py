"""Training: the loss goes down, Ctrl-C leaves a resumable checkpoint, and resuming reproduces
the uninterrupted run's loss curve and weights exactly."""

from __future__ import annotations

import pytest
import torch

from llmquant.distill.recipe import DistillRecipe
from llmquant.distill.student import make_student
from llmquant.distill.trainer import Trainer, TrainingInterrupted, lr_lambda


def _recipe(**train) -> DistillRecipe:
    return DistillRecipe.from_dict({
        "student": {"keep_layers": [0, 3]},
        "loss": {"divergence": "forward_kl", "temperature": 2.0, "kd_weight": 0.8, "hidden_weight": 0.5},
        "teacher": {"mode": "online"},
        "train": {"steps": 6, "batch_size": 2, "grad_accum": 2, "seq_len": 64, "lr": 3e-3, "warmup_steps": 2,
                  "mixed_precision": "bf16", **train},
    })


def _student(teacher, windows):
    student, plan = make_student(teacher.model, windows[:2], keep_layers=[0, 3])
    return student, plan.kept_layers


def test_resume_after_ctrl_c_reproduces_the_uninterrupted_run_exactly(teacher, windows, tmp_path):
    rec = _recipe()
    student, kept = _student(teacher, windows)
    full = Trainer(student, rec, windows=windows, teacher=teacher.model, kept_layers=kept, progress=False).train()
    losses = [h["loss"] for h in full.history]
    assert len(losses) == 6 and all("hidden" in h and "kd" in h for h in full.history)

    def ctrl_c_at_step_3(step, record):
        if step == 3:
            raise KeyboardInterrupt

    ckpt = tmp_path / "ckpt"
    student, _ = _student(teacher, windows)
    with pytest.raises(TrainingInterrupted, match="step 3 of 6.*--resume"):
        Trainer(student, rec, windows=windows, teacher=teacher.model, kept_layers=kept, checkpoint_dir=ckpt,
                progress=False, on_step=ctrl_c_at_step_3).train()
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-000003"]

    fresh, _ = _student(teacher, windows)  # new process, same recipe: weights come from the checkpoint
    trainer = Trainer(fresh, rec, windows=windows, teacher=teacher.model, kept_layers=kept, checkpoint_dir=ckpt,
                      progress=False)
    resumed = trainer.train(resume=True)
    assert resumed.resumed_from.endswith("step-000003")
    assert [h["loss"] for h in resumed.history] == losses  # bit-for-bit, steps 1-3 restored, 4-6 recomputed
    assert [h["lr"] for h in resumed.history] == [h["lr"] for h in full.history]
    # And the weights equal those of an uninterrupted run.
    rerun, _ = _student(teacher, windows)
    again = Trainer(rerun, rec, windows=windows, teacher=teacher.model, kept_layers=kept, progress=False)
    again.train()
    for (name, a), b in zip(again.unwrapped_student().state_dict().items(),
                            trainer.unwrapped_student().state_dict().values()):
        assert torch.equal(a, b), name


def test_offline_cache_training_reduces_kd_loss(teacher, windows, tmp_path):
    from llmquant.distill.teacher_cache import fill_from_model

    rec = DistillRecipe.from_dict({"student": {"keep_layers": [0, 3]},
                                   "loss": {"kd_weight": 1.0, "temperature": 1.0}, "teacher": {"mode": "offline"},
                                   "train": {"steps": 8, "batch_size": 4, "seq_len": 64, "lr": 3e-3,
                                             "warmup_steps": 0, "mixed_precision": "no"}})
    cache = fill_from_model(teacher.model, windows[:8], tmp_path / "c", k=16, progress=False)
    student, _ = _student(teacher, windows)
    result = Trainer(student, rec, cache=cache, progress=False).train()
    kd = [h["kd"] for h in result.history]
    assert sum(kd[-2:]) < 0.8 * sum(kd[:2])  # 8 steps over the same 8 windows: the student moves to the teacher


def test_schedules():
    cos = lr_lambda("cosine", 2, 10, 0.1)
    assert [round(cos(s), 6) for s in (0, 1, 2, 10)] == [0.5, 1.0, 1.0, 0.1]
    assert cos(6) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    lin = lr_lambda("linear", 0, 10, 0.0)
    assert [lin(s) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]
    assert lr_lambda("constant", 3, 10, 0.1)(9) == 1.0


def test_hidden_state_loss_trains_a_projection_when_widths_differ(teacher, windows, tmp_path):
    from llmquant.distill.student import student_from_config

    cfg = tmp_path / "narrow.json"
    cfg.write_text('{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, '
                   f'"num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": {len(teacher.tokenizer)}}}')
    rec = DistillRecipe.from_dict({"student": {"config": str(cfg)},
                                   "loss": {"kd_weight": 0.5, "hidden_weight": 1.0},
                                   "train": {"steps": 3, "batch_size": 2, "seq_len": 64, "lr": 1e-2,
                                             "warmup_steps": 0, "mixed_precision": "no"}})
    trainer = Trainer(student_from_config(cfg, teacher.tokenizer), rec, windows=windows, teacher=teacher.model,
                      progress=False)
    # 2 student layers spread over 4 teacher layers: outputs of teacher layers 1 and 3.
    assert trainer.layer_pairs == [(0, 1), (1, 3)] and set(trainer.projections) == {"0", "1"}
    before = trainer.projections["1"].weight.detach().clone()
    result = trainer.train()
    assert all(h["hidden"] > 0 for h in result.history)
    assert not torch.equal(before, trainer.projections["1"].weight)  # the projection is trained too
