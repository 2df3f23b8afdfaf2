"""The real default model (SmolLM2-135M-Instruct) against Hugging Face transformers."""

from __future__ import annotations

import pytest
import torch

from tpi_node.commands.compose import build_local_engine
from tpi_node.model.sampling_params import SamplingParams

PROMPT = "Write a short story about a robot who learns to paint."


@pytest.fixture(scope="module")
def engine(smollm2_dir):
    e = build_local_engine(smollm2_dir, progress=False)
    yield e
    e.shutdown()


def test_greedy_chat_tokens_equal_transformers(smollm2_dir, smollm2_hf, engine):
    """Served from the Q4_1 blocks (the quantised kernel and dequantise + GEMM) against transformers
    on the same GGUF: the same 32 greedy tokens."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)  # the GGUF tokenizer; its template is ours
    hf = smollm2_hf
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    assert ids == engine.tokenizer.encode(
        engine.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}]), add_special_tokens=False
    )
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids) :].tolist()
    got = [ev.token_id for ev in engine.generate_sync(ids, SamplingParams(max_tokens=32, temperature=0))]
    assert len(ref) >= 24
    assert got[: len(ref)] == ref


def test_batched_greedy_equals_alone(engine):
    """Continuous batching: a sequence's greedy tokens do not depend on what else is in the step."""
    import threading

    tok = engine.tokenizer
    prompts = [PROMPT, "List three fruits.", "What is 2+2?", "Name a color."]
    ids = [
        tok.encode(tok.apply_chat_template([{"role": "user", "content": p}]), add_special_tokens=False) for p in prompts
    ]
    params = SamplingParams(max_tokens=20, temperature=0)
    alone = [[ev.token_id for ev in engine.generate_sync(i, params)] for i in ids]
    together: list = [None] * len(ids)

    def run(k):
        together[k] = [ev.token_id for ev in engine.generate_sync(ids[k], params)]

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(ids))]
    steps0 = engine.counters.steps
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert together == alone
    # they really shared steps: far fewer steps than the tokens generated
    assert engine.counters.steps - steps0 < sum(len(a) for a in alone)


@pytest.mark.parametrize("act", ["none", "int8"])
def test_decode_layers_in_one_call_equal_the_layer_loop(engine, act):
    """One node holding every layer runs a decode step's layer loop as one C call
    (decode_ops.DecodeStack): the loop's arithmetic, so its hidden states are the loop's bit for
    bit, for three sequences decoding together (exact and with int8 activations)."""
    from tpi_node.engine.batch import BatchLayout
    from tpi_node.model import qkernel

    runner = engine.driver.runner
    assert runner.stack is not None  # the default model on one node takes it
    qkernel.use_act_quant(act)
    if act == "int8" and not qkernel.TUNING.int8_activations:
        pytest.skip("no AVX512-VNNI here: --act-quant int8 runs the exact kernel")
    g = torch.Generator().manual_seed(0)
    hidden = engine.hidden_size
    prefill = BatchLayout((1, 2, 3), (0, 0, 0), (40, 7, 23), ((0, 1, 2), (3,), (4, 5)))
    runner.forward(prefill, torch.randn(70, hidden, generator=g))  # the KV the decode steps attend to
    steps = [BatchLayout((1, 2, 3), (40 + k, 7 + k, 23 + k), (1, 1, 1), ((0, 1, 2), (3,), (4, 5))) for k in range(3)]
    xs = [torch.randn(3, hidden, generator=g) for _ in steps]
    stack, runner.stack = runner.stack, None
    try:
        loop = [runner.forward(layout, x) for layout, x in zip(steps, xs)]  # writes the same KV slots
    finally:
        runner.stack = stack
    whole = [runner.forward(layout, x) for layout, x in zip(steps, xs)]
    assert all(torch.equal(a, b) for a, b in zip(whole, loop))
    assert not torch.equal(whole[0], whole[1])  # real steps, not a constant
