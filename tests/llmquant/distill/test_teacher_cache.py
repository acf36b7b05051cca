"""Offline teacher top-k: what is written is what the teacher computed, and reads back by index."""

from __future__ import annotations

import json

import pytest
import torch

from llmquant.distill.teacher_cache import TeacherCache, fill_from_model
from llmquant.errors import DataSourceError


def test_top_k_round_trip_matches_the_teacher(teacher, windows, tmp_path):
    seqs = windows[:6]
    cache = fill_from_model(teacher.model, seqs, tmp_path / "cache", k=8, batch_size=4, shard_sequences=4,
                            progress=False)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["shards"] == ["shard-00000.safetensors", "shard-00001.safetensors"]  # 4 + 2 sequences
    assert (len(cache), cache.k, cache.seq_len) == (6, 8, 64)
    assert torch.equal(cache.input_ids(), seqs)

    idx = torch.tensor([5, 0, 3])  # across both shards, out of order
    ids, top_ids, top_lp = cache.get(idx)
    assert torch.equal(ids, seqs[idx]) and top_ids.shape == (3, 63, 8) and top_lp.dtype == torch.float32
    with torch.no_grad():
        ref = torch.log_softmax(teacher.model(seqs[idx], use_cache=False).logits[:, :-1].float(), -1)
    values, ref_ids = torch.topk(ref, 8, dim=-1)
    assert torch.allclose(top_lp, values, atol=2e-3, rtol=1e-3)  # stored as float16
    # Ids agree wherever the teacher's values are not tied within float16 rounding.
    gaps = (values[..., :-1] - values[..., 1:]).abs() > 1e-2
    assert torch.equal(top_ids[..., :-1][gaps], ref_ids[..., :-1][gaps]) and gaps.float().mean() > 0.5
    assert torch.allclose(ref.gather(-1, top_ids), top_lp, atol=2e-3)


def test_opening_a_folder_that_is_not_a_cache_fails_clearly(tmp_path):
    with pytest.raises(DataSourceError, match="not a teacher cache"):
        TeacherCache.open(tmp_path)
