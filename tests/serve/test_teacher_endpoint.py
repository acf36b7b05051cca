"""Filling a distillation teacher cache from a real `llmquant serve` process over HTTP (prompt
`top_logprobs` with `echo` and `max_tokens: 0`), compared with the same teacher run locally."""

from __future__ import annotations

import torch

from llmquant.distill.teacher_cache import PAD_LOGPROB, fill_from_endpoint, fill_from_model, token_string_map


def test_endpoint_cache_matches_local_teacher(server, tiny_loaded, tmp_path):
    from llmquant.distill.data import training_windows

    seqs = training_windows(tiny_loaded.tokenizer, seq_len=48, max_tokens=48 * 3)
    remote = fill_from_endpoint(server.base_url + "/v1", tiny_loaded.tokenizer, seqs, tmp_path / "remote", k=5,
                                progress=False)
    local = fill_from_model(tiny_loaded.model, seqs, tmp_path / "local", k=5, progress=False)
    assert remote.manifest["teacher"].startswith("tiny at ")  # the model name was read from /v1/models
    idx = torch.arange(3)
    r_ids, r_top, r_lp = remote.get(idx)
    l_ids, l_top, l_lp = local.get(idx)
    assert torch.equal(r_ids, l_ids)
    filled = r_lp > PAD_LOGPROB / 2
    # The API names tokens by text; texts several ids share (single bytes of multi-byte UTF-8
    # characters all decode to U+FFFD) cannot be mapped back and stay empty. In a 512-token
    # byte-level BPE they are common; most slots still map.
    assert filled.float().mean() > 0.8
    # The best token and its log-prob agree with the local teacher wherever its text is unambiguous.
    unique = token_string_map(tiny_loaded.tokenizer)
    mappable = torch.tensor([[unique.get(tiny_loaded.tokenizer.decode([int(i)])) is not None for i in row]
                             for row in l_top[..., 0].reshape(-1, l_top.shape[1])]).reshape(l_top.shape[:2])
    assert mappable.float().mean() > 0.5
    assert torch.equal(r_top[..., 0][mappable], l_top[..., 0][mappable])
    assert torch.allclose(r_lp[..., 0][mappable], l_lp[..., 0][mappable], atol=2e-3)
    # Every filled slot is a real top-5 entry of the local teacher, with its log-prob.
    with torch.no_grad():
        ref = torch.log_softmax(tiny_loaded.model(seqs, use_cache=False).logits[:, :-1].float(), -1)
    assert torch.allclose(ref.gather(-1, r_top)[filled], r_lp[filled], atol=2e-3)
