"""Sampling from a vocabulary cut into slices (the lm_head split by rows across nodes): what one
slice of a row's logits gives (`pack_rows`), how the master merges the slices (`merge`), and the
noise every non-greedy draw uses (`gumbel`).

Every draw is a Gumbel-max: token = argmax_i (l_i / T + g_i) over the allowed ids, where g_i is
Gumbel noise that depends only on (seed, draw, i): a counter-based hash, not a random stream. So
a node draws the noise of its own ids, and the best perturbed logit over the nodes is the best
over the vocabulary: the split head samples exactly what the whole row samples, same seed, same
token. The other choices merge exactly too:
  greedy         the best logit (ties: the lowest id, as torch.argmax gives it)
  top-k          the k best by (logit desc, id asc) are among the union of every slice's k best
  logprobs       log-sum-exp of the row = logsumexp of the slices' log-sum-exps
Only top-p over the whole vocabulary, penalties and grammar masks need the whole row
(engine/vocab.py gathers it for those rows).

A row's pack, one slice, float32 (ids are exact in float32 below 2**24):
  [lse, target logit (0 when the target is not in the slice), gumbel id, its logit, its
   perturbed value, k ids, k logits]   with k = the widest ask of the step (unused: id -1)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

M32 = 0xFFFFFFFF
HEAD = 5  # lse, target logit, gumbel id, gumbel logit, gumbel value
NO_ID = -1.0


@dataclass(frozen=True)
class RowAsk:
    """What sampling needs of one row. k: best candidates wanted (>= 1); temperature > 0 with
    `gumbel`: the row's Gumbel-max over the whole vocabulary (seed, draw); target: an id whose
    logit is wanted (a prompt token's logprob), -1 for none."""

    k: int = 1
    gumbel: bool = False
    temperature: float = 1.0
    seed: int = 0
    draw: int = 0
    target: int = -1


@dataclass
class Candidates:
    """One row, merged over the slices: ids / logits best first (by logit desc, id asc)."""

    lse: float  # log-sum-exp of the raw logits of the whole row
    ids: list[int]
    logits: list[float]
    target_logit: float = 0.0
    gumbel_id: int = -1
    gumbel_logit: float = 0.0


# ---- counter-based Gumbel noise ---------------------------------------------------------------
def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (lowbias32's shape) on int64 tensors holding uint32 values: a
    bijection. Its multipliers are under 2**31, so no int64 product overflows."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & M32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & M32
    return x ^ (x >> 16)


def _mix_int(v: int) -> int:
    """_mix on one Python int (the same bits, no tensor)."""
    x = v & M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x5BD1E995) & M32
    return x ^ (x >> 16)


def _keys(seed: int, draw: int) -> tuple[int, int]:
    a = _mix_int((seed & M32) ^ 0x243F6A88)
    b = _mix_int(((seed >> 32) & M32) ^ a ^ 0x85A308D3)
    return b, _mix_int((draw & M32) ^ _mix_int(b ^ 0x13198A2E))


def gumbel(seed: int, draw: int, ids: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise [n] float32 for token ids [n] (int64) of draw `draw` of the sequence
    seeded `seed`: the same (seed, draw, id) gives the same value on every node."""
    b, c = _keys(seed, draw)
    x = _mix((ids.to(torch.int64) * 0x9E3779B1 + b) & M32)  # ids < 2**24: no overflow
    x = _mix(x ^ c)
    u = (x.double() + 0.5) * (1.0 / 2**32)  # in (0, 1)
    return (-torch.log(-torch.log(u))).float()


def perturbed(logits: torch.Tensor, ask: RowAsk, ids: torch.Tensor) -> torch.Tensor:
    """l / T + g for the ids [n] of logits [n]: the values a Gumbel-max compares."""
    return logits.float() / ask.temperature + gumbel(ask.seed, ask.draw, ids)


# ---- one slice --------------------------------------------------------------------------------
def top_candidates(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [n] -> (values, indices) of the k best by (value desc, index asc): exact order,
    whatever torch.topk does with ties."""
    k = min(k, logits.shape[-1])
    if k == 1:
        i = torch.argmax(logits)  # the first of equal maxima
        return logits[i].reshape(1), i.reshape(1)
    vals, idx = torch.topk(logits, k)
    kth = vals[-1]
    ties = (logits == kth).nonzero().reshape(-1)  # ascending
    if len(ties) > int((vals == kth).sum()):  # the cut falls among equal values: keep the lowest ids
        above = idx[vals > kth]
        idx = torch.cat([above, ties[: k - len(above)]])
        vals = logits[idx]
    order = torch.sort(idx).indices
    idx, vals = idx[order], vals[order]
    order = torch.sort(-vals, stable=True).indices
    return vals[order], idx[order]


def width(asks: list[RowAsk]) -> int:
    """Floats per row of a pack: the widest ask decides."""
    return HEAD + 2 * max((a.k for a in asks), default=1)


def pack_rows(logits: torch.Tensor, offset: int, asks: list[RowAsk]) -> torch.Tensor:
    """logits [R, n] of vocabulary ids [offset, offset + n) -> packs [R, width(asks)] float32."""
    logits = logits.float()
    out = torch.full((len(asks), width(asks)), NO_ID, dtype=torch.float32)
    if not asks:
        return out
    n = logits.shape[1]
    out[:, 0] = torch.logsumexp(logits, dim=1)
    ids_all = None
    for r, ask in enumerate(asks):
        row = logits[r]
        t = ask.target - offset
        out[r, 1] = row[t] if 0 <= t < n else 0.0
        if ask.gumbel:
            if ids_all is None:
                ids_all = torch.arange(offset, offset + n, dtype=torch.int64)
            v = perturbed(row, ask, ids_all)
            j = int(torch.argmax(v))
            out[r, 2:5] = torch.tensor([float(offset + j), float(row[j]), float(v[j])])
        vals, idx = top_candidates(row, ask.k)
        out[r, HEAD : HEAD + len(idx)] = (idx + offset).float()
        out[r, HEAD + ask.k : HEAD + ask.k + len(vals)] = vals
    return out


# ---- the master -------------------------------------------------------------------------------
def merge(packs: list[torch.Tensor], asks: list[RowAsk]) -> list[Candidates]:
    """Every slice's packs [R, width] (slices in vocabulary order) -> one Candidates per row."""
    stack = torch.stack([p.reshape(len(asks), -1) for p in packs])  # [S, R, W]
    lse = torch.logsumexp(stack[:, :, 0], dim=0).tolist()
    target = stack[:, :, 1].sum(0).tolist()  # the one slice holding it; 0 elsewhere
    out = []
    for r, ask in enumerate(asks):
        rows = stack[:, r]  # [S, W]
        ids = rows[:, HEAD : HEAD + ask.k].reshape(-1)
        vals = rows[:, HEAD + ask.k : HEAD + 2 * ask.k].reshape(-1)
        real = ids >= 0
        ids, vals = ids[real].long(), vals[real]
        order = torch.sort(ids).indices  # (logit desc, id asc), as one slice orders them
        ids, vals = ids[order], vals[order]
        order = torch.sort(-vals, stable=True).indices[: ask.k]
        c = Candidates(lse[r], ids[order].tolist(), vals[order].tolist(), target[r])
        if ask.gumbel:
            g = rows[:, 2:5].tolist()  # [id, logit, value] per slice
            best = max(g, key=lambda e: (e[2], -e[0]))
            c.gumbel_id, c.gumbel_logit = int(best[0]), best[1]
        out.append(c)
    return out


def whole_row(logits: torch.Tensor, ask: RowAsk) -> Candidates:
    """A row's candidates from the whole vocabulary (an unsplit head): the one-slice merge."""
    return merge([pack_rows(logits.reshape(1, -1), 0, [ask])], [ask])[0]


def gumbel_choice(logits: torch.Tensor, ids: torch.Tensor, ask: RowAsk) -> int:
    """The Gumbel-max among candidate ids [n] with logits [n] (ties: the earlier candidate)."""
    return int(ids[int(torch.argmax(perturbed(logits, ask, ids)))])


def logprob(logit: float, lse: float) -> float:
    return logit - lse if math.isfinite(lse) else float("-inf")
