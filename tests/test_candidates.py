"""The split head's sampling math (model/candidates.py): every slice's pack merged on the master
chooses the token the whole row chooses, for greedy, temperature, top-k, top-p within top-k and
logprobs, ties included; the Gumbel noise is a function of (seed, draw, id) alone."""

import pytest
import torch

from tpi_node.model.candidates import RowAsk, gumbel, merge, pack_rows, top_candidates
from tpi_node.model.sampling import Sampler
from tpi_node.model.sampling_params import SamplingParams

V = 1000


def _logits(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    row = torch.randn(V, generator=g) * 3
    row[[10, 400, 999]] = row.max()  # equal best logits across slices
    row[50:60] = 1.25  # a run of ties inside one slice
    return row


def _split(row: torch.Tensor, cuts: list[int], asks: list[RowAsk]) -> list:
    bounds = [0, *cuts, V]
    packs = [pack_rows(row[None, a:b], a, asks) for a, b in zip(bounds, bounds[1:])]
    return merge(packs, asks)


PARAMS = [
    {"temperature": 0.0},
    {"temperature": 0.0, "logprobs": 5},
    {"temperature": 0.8},
    {"temperature": 1.3, "top_k": 40},
    {"temperature": 1.0, "top_k": 12, "top_p": 0.7, "logprobs": 3},
    {"temperature": 1.0, "top_k": 1},
]


@pytest.mark.parametrize("extra", PARAMS)
@pytest.mark.parametrize("cuts", [[], [500], [64, 448, 700], [1, 2, 998]])
def test_split_rows_choose_what_the_whole_row_chooses(extra, cuts):
    whole, split = Sampler(SamplingParams(seed=7, **extra), [1]), Sampler(SamplingParams(seed=7, **extra), [1])
    generated: list[int] = []
    for step in range(25):
        row = _logits(step)
        ask = split.ask(len(generated), V)
        assert ask is not None
        got = split.choose(_split(row, cuts, [ask])[0], generated, V)
        want = whole(row, generated)
        assert got.token_id == want.token_id
        assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
        if want.top_logprobs is not None:
            assert [t for t, _ in got.top_logprobs] == [t for t, _ in want.top_logprobs] or len(
                {round(v, 5) for _, v in want.top_logprobs}
            ) < len(want.top_logprobs)  # equal logprobs may list in another order
        generated.append(want.token_id)


def test_whole_row_needed_for_penalties_and_nucleus_over_the_vocabulary():
    assert Sampler(SamplingParams(temperature=0.7, top_p=0.9), []).ask(0, V) is None
    assert Sampler(SamplingParams(repetition_penalty=1.2), []).ask(0, V) is None
    assert Sampler(SamplingParams(temperature=0.7, top_k=20, top_p=0.9), []).ask(0, V) is not None


def test_top_candidates_order_ties_by_id():
    row = torch.tensor([1.0, 3.0, 2.0, 3.0, 2.0, 2.0, 0.0])
    vals, ids = top_candidates(row, 4)
    assert ids.tolist() == [1, 3, 2, 4] and vals.tolist() == [3.0, 3.0, 2.0, 2.0]


def test_prompt_targets_and_log_sum_exp_merge():
    row = _logits(3)
    asks = [RowAsk(k=3, target=t) for t in (0, 499, 500, 999)]
    rows = row.expand(4, V)
    bounds = [0, 333, 500, V]
    merged = merge([pack_rows(rows[:, a:b], a, asks) for a, b in zip(bounds, bounds[1:])], asks)
    for c, ask in zip(merged, asks):
        assert c.lse == pytest.approx(float(torch.logsumexp(row, 0)), abs=1e-5)
        assert c.target_logit == float(row[ask.target])


def test_gumbel_noise_depends_on_seed_draw_and_id_only():
    ids = torch.arange(50000)
    g = gumbel(5, 3, ids)
    assert torch.equal(g[1000:2000], gumbel(5, 3, ids[1000:2000]))
    assert not torch.equal(g, gumbel(5, 4, ids)) and not torch.equal(g, gumbel(6, 3, ids))
    # standard Gumbel: mean = Euler-Mascheroni, variance = pi^2 / 6
    assert float(g.double().mean()) == pytest.approx(0.5772, abs=0.02)
    assert float(g.double().var()) == pytest.approx(1.6449, abs=0.05)
    # the draws of consecutive tokens are uncorrelated
    assert abs(float(torch.corrcoef(torch.stack([g, gumbel(5, 4, ids)]))[0, 1])) < 0.02
