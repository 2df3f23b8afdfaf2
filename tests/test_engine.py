"""The engine's scheduler on a real (tiny, random) model: finish reasons, cancellation, limits."""

from __future__ import annotations

import asyncio
import time

import pytest

from tpi_node.commands.compose import build_local_engine
from tpi_node.engine.client import ClusterNotReady, EngineError, QueueFull
from tpi_node.engine.limits import EngineLimits
from tpi_node.model.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    e = build_local_engine(tiny_model_dir("tiny-llama"), progress=False, limits=EngineLimits(max_queue=4))
    yield e
    e.shutdown()


def kv_entries(engine) -> int:
    return len(engine.scheduler.pool.tables)  # sequences holding KV blocks


def test_max_tokens_finishes_with_length(engine):
    evs = list(engine.generate_sync([1, 2, 3, 4], SamplingParams(max_tokens=7, temperature=0, ignore_eos=True)))
    assert len(evs) == 7 and evs[-1].finish_reason == "length"
    assert all(e.finish_reason is None for e in evs[:-1])
    assert kv_entries(engine) == 0  # finished sequences leave no cache behind


def test_seeded_sampling_repeats_and_differs_by_seed(engine):
    def run(seed):
        p = SamplingParams(max_tokens=12, temperature=1.0, seed=seed, ignore_eos=True)
        return [e.token_id for e in engine.generate_sync([5, 6, 7], p)]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_stop_string_ends_generation_and_is_not_emitted(engine):
    p = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    full = "".join(e.text for e in engine.generate_sync([9, 10, 11], p))
    assert len(full) > 4
    stop = full[2:4]
    evs = list(
        engine.generate_sync([9, 10, 11], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop=(stop,)))
    )
    text = "".join(e.text for e in evs)
    assert evs[-1].finish_reason == "stop"
    assert stop not in text and full.startswith(text) and text == full[: full.index(stop)]


def test_cancel_frees_the_sequence(engine):
    async def go():
        agen = engine.generate([1, 2, 3], SamplingParams(max_tokens=500, temperature=0, ignore_eos=True))
        n = 0
        async for _ in agen:
            n += 1
            if n == 3:
                break
        await agen.aclose()
        return n

    assert asyncio.run(go()) == 3
    deadline = time.monotonic() + 5
    while kv_entries(engine) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert kv_entries(engine) == 0 and engine.stats()["running"] == 0


def test_queue_bound_and_bad_prompts(engine):
    with pytest.raises(EngineError, match="empty"):
        list(engine.generate_sync([], SamplingParams(max_tokens=2)))
    with pytest.raises(EngineError) as e:
        list(engine.generate_sync([1] * (engine.max_context + 1), SamplingParams(max_tokens=2)))
    assert e.value.code == "context_length_exceeded"
    # hold the step thread (it needs this lock to admit work) while the queue fills up
    with engine._cv:
        for _ in range(engine.limits.max_queue):
            engine._submit([1, 2], SamplingParams(max_tokens=1), "", _NullSink())
        with pytest.raises(QueueFull):
            engine._submit([1, 2], SamplingParams(max_tokens=1), "", _NullSink())
    deadline = time.monotonic() + 10
    while engine.stats()["waiting"] + engine.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.stats()["waiting"] == 0


class _NullSink:
    def put(self, item):
        pass


def test_not_ready_after_shutdown(tiny_model_dir):
    e = build_local_engine(tiny_model_dir("tiny-llama"), progress=False)
    e.shutdown()
    with pytest.raises(ClusterNotReady):
        list(e.generate_sync([1, 2], SamplingParams(max_tokens=2)))
