"""Choosing a GGUF block type's stored scales for a slice of weights.

`choose_params(x, importance, type)` takes weights viewed as (rows, blocks, block) and returns
the `BlockParams` that will be written. For each group it searches candidate grids, refits the
scale (and offset) of each candidate by weighted least squares on the codes that candidate
gives, rounds to the stored precision, and keeps the candidate with the smallest weighted
squared error. The weights of that error are `importance`, one per input column: the GPTQ
Hessian's diagonal when calibrating (the error a column causes in the layer's outputs, as
llama.cpp's imatrix approximates it), or uniform.

K-quants then store each block's group scales (and mins) as 6-bit integers (Q6_K: int8) times
one f16 per block; those are rounded from the searched values with the block's largest as the
top of the 6-bit range.

GPTQ calls this once per block as it reaches the block's first column, on the weights as
updated by the error feedback so far; plain rounding calls it once on the whole weight.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmquant.quant.algorithms.gptq import few_threads
from llmquant.export.gguf.ggml_types import AFFINE, K_AFFINE, K_SYM, SYM, BlockParams, GGMLType, as_f16, round_codes

# Candidate grids per group: the full range shrunk by these factors (clipping the extremes
# trades a large error on one weight for smaller errors on all the others).
SHRINK = torch.tensor([1.0, 0.97, 0.94, 0.91, 0.88, 0.85, 0.82, 0.79, 0.76, 0.73, 0.70])
SEARCH_CHUNK = 1 << 16  # weights searched at once (times the candidates): bounds the temporaries


def choose_params(x: Tensor, importance: Tensor | None, t: GGMLType) -> BlockParams:
    """x (rows, blocks, t.block) float; importance (blocks, t.block) or None -> BlockParams."""
    rows, blocks, _ = x.shape
    x = x.float()
    wt = (importance.float().clamp(min=0) + 1e-12 if importance is not None
          else torch.ones(blocks, t.block, device=x.device))
    wt = wt.reshape(1, blocks, t.groups_per_block, t.group)
    g = x.reshape(rows, blocks, t.groups_per_block, t.group)
    per_row = max(1, SEARCH_CHUNK // max(1, blocks * t.block * len(SHRINK)))
    # Many small operations on cache-sized slices: one thread (a second one only waits on
    # barriers, and on a busy machine that made the search 10x slower).
    with few_threads(x.device):
        parts = [_search(g[i:i + per_row], wt, t) for i in range(0, rows, per_row)]
    scale = torch.cat([p[0] for p in parts])  # (rows, blocks, groups)
    offset = torch.cat([p[1] for p in parts])
    return _store(scale, offset, t)


def _search(g: Tensor, wt: Tensor, t: GGMLType) -> tuple[Tensor, Tensor]:
    """Best (scale, offset) per group of g (rows, blocks, groups, group), at full float precision
    except for the 32-blocks, whose scales are stored as f16 directly and so rounded here."""
    cand = SHRINK.to(g.device).reshape(-1, 1, 1, 1, 1)  # (K, 1, 1, 1, 1)
    xs = g.unsqueeze(0)  # (1, rows, blocks, groups, group)
    w = wt.unsqueeze(0)
    direct_f16 = t.kind in (SYM, AFFINE)
    if t.kind in (SYM, K_SYM):
        # The value of largest magnitude lands on the code's most negative level (umin - center), as
        # llama.cpp's Q4_0 does: that side of the grid has one level more. The candidates also
        # try it on the positive side (center - 1).
        idx = g.abs().argmax(dim=-1, keepdim=True)
        peak = torch.gather(g, -1, idx).unsqueeze(0)  # (1, rows, blocks, groups, 1)
        neg = peak / -float(t.center - t.umin) * cand
        pos = peak / float(t.center - 1) * cand
        scale = torch.cat([neg, pos])  # (2K, rows, blocks, groups, 1)
        offset = -float(t.center) * scale
    else:
        lo = g.amin(dim=-1, keepdim=True).unsqueeze(0)
        hi = g.amax(dim=-1, keepdim=True).unsqueeze(0)
        if t.kind == K_AFFINE:  # the stored min is subtracted and unsigned: offset <= 0
            lo = lo.clamp(max=0)
        span = (hi - lo)
        # Shrink from the top, from the bottom, and from both ends.
        lows = torch.cat([lo.expand(cand.shape[0], *lo.shape[1:]), lo + (1 - cand) * span, lo + (1 - cand) * span / 2])
        highs = torch.cat([lo + cand * span, hi.expand(cand.shape[0], *hi.shape[1:]), hi - (1 - cand) * span / 2])
        scale = (highs - lows) / t.umax
        offset = lows
    if direct_f16:
        scale, offset = _f16_grid(scale, offset, t)
    u = round_codes(xs, scale, offset, t)
    scale, offset = _refit(xs, w, u, scale, offset, t)
    if direct_f16:
        scale, offset = _f16_grid(scale, offset, t)
        u = round_codes(xs, scale, offset, t)
    err = ((xs - (scale * u + offset)).pow(2) * w).sum(-1)  # (K', rows, blocks, groups)
    best = err.argmin(dim=0, keepdim=True)  # (1, rows, blocks, groups)
    pick = lambda v: torch.gather(v.squeeze(-1), 0, best).squeeze(0)  # noqa: E731
    return pick(scale.expand(*err.shape, 1)), pick(offset.expand(*err.shape, 1))


def _refit(x: Tensor, w: Tensor, u: Tensor, scale: Tensor, offset: Tensor, t: GGMLType) -> tuple[Tensor, Tensor]:
    """Weighted least squares on fixed codes: the scale (symmetric kinds: offset = -center *
    scale) or the scale and offset (affine kinds) that best fit x. Degenerate fits keep theirs."""
    if t.kind in (SYM, K_SYM):
        q = u - float(t.center)
        num = (w * x * q).sum(-1, keepdim=True)
        den = (w * q * q).sum(-1, keepdim=True)
        new = torch.where(den > 0, num / den.clamp(min=1e-30), scale)
        return new, -float(t.center) * new
    # minimize sum w (x - s u - o)^2 over (s, o): the 2x2 normal equations.
    sw = w.sum(-1, keepdim=True)
    su = (w * u).sum(-1, keepdim=True)
    suu = (w * u * u).sum(-1, keepdim=True)
    sx = (w * x).sum(-1, keepdim=True)
    sux = (w * u * x).sum(-1, keepdim=True)
    det = sw * suu - su * su
    ok = det.abs() > 1e-12 * (sw * suu).clamp(min=1e-30)
    s = torch.where(ok, (sw * sux - su * sx) / torch.where(ok, det, torch.ones_like(det)), scale)
    o = torch.where(ok, (sx - s * su) / sw.clamp(min=1e-30), offset)
    if t.kind == K_AFFINE:
        # offset must stay <= 0: where the fit wants it above, pin it at 0 and refit the scale.
        pin = o > 0
        s0 = torch.where(suu > 0, sux / suu.clamp(min=1e-30), scale)
        s, o = torch.where(pin, s0, s), torch.where(pin, torch.zeros_like(o), o)
    s = torch.where(s > 0, s, scale)  # a scale must not flip or vanish (the codes assumed its sign)
    return s, o


def _f16_grid(scale: Tensor, offset: Tensor, t: GGMLType) -> tuple[Tensor, Tensor]:
    """Round a 32-block type's stored numbers to f16 (Q*_0: d; Q*_1: d and m)."""
    if t.kind == SYM:
        d = as_f16(scale)
        return d, -float(t.center) * d
    return as_f16(scale), as_f16(offset)


def _store(scale: Tensor, offset: Tensor, t: GGMLType) -> BlockParams:
    """The chosen per-group grids, as the type stores them."""
    if t.kind == SYM:
        return BlockParams(t, d=scale[..., 0])
    if t.kind == AFFINE:
        return BlockParams(t, d=scale[..., 0], m=offset[..., 0])
    if t.kind == K_AFFINE:
        mins = -offset  # >= 0
        d = as_f16(scale.amax(dim=-1) / 63.0)
        dmin = as_f16(mins.amax(dim=-1) / 63.0)
        sc = _six_bit(scale, d, 63)
        mn = _six_bit(mins, dmin, 63)
        return BlockParams(t, d=d, dmin=dmin, sc=sc, mins=mn)
    # K_SYM: signed int8 scales, the largest magnitude at 127.
    d = as_f16(scale.abs().amax(dim=-1) / 127.0)
    return BlockParams(t, d=d, sc=_six_bit(scale, d, 127, lowest=-128))


def _six_bit(values: Tensor, d: Tensor, top: int, lowest: int = 0) -> Tensor:
    """round(values / d) in [lowest, top] per group; 0 where the block's d is 0."""
    safe = torch.where(d == 0, torch.ones_like(d), d).unsqueeze(-1)
    q = torch.round(values / safe).clamp_(lowest, top)
    return torch.where(d.unsqueeze(-1) == 0, torch.zeros_like(q), q)
