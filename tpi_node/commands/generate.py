"""`tpi-node generate --prompt P`: text for one prompt on stdout (logs on stderr), on one node or
a local cluster of --nodes processes."""

from __future__ import annotations

import dataclasses
import sys
import time

from tpi_node.commands.compose import build_local_engine, say
from tpi_node.commands.local_cluster import LocalCluster
from tpi_node.engine.device import default_dtype, select_device
from tpi_node.errors import UserError
from tpi_node.model.sampling_params import SamplingParams
from tpi_node.settings import GenerateSettings, MasterSettings
from tpi_node.weights import cache
from tpi_node.weights.prepare import resolve_model


def run(s: GenerateSettings) -> int:
    try:
        params = SamplingParams(
            max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, seed=s.seed
        )
    except ValueError as e:
        raise UserError(str(e)) from None
    info = select_device(s.device)  # a device that is not here is the cheapest mistake to report
    model_dir = resolve_model(s.model)
    nodes = s.nodes or 1
    if nodes > 1:
        fields = {f.name for f in dataclasses.fields(MasterSettings)}
        master = MasterSettings(**{k: v for k, v in dataclasses.asdict(s).items() if k in fields}, node_id="local")
        cluster = LocalCluster(dataclasses.replace(master, model=str(model_dir)), nodes)
        engine, close = cluster.running.engine, cluster.close
    else:
        say(f"computing on {info.summary()}")
        engine = build_local_engine(
            model_dir,
            dtype=default_dtype(info, s.dtype),
            memory_budget=s.memory_budget,
            device=str(info.device),
            kv_blocks=s.kv_blocks,
            max_context=s.max_context,
            quant=s.quant,
            prefix_cache=not s.no_prefix_cache,
            speculative=s.speculative,
            fast_path=s.fast_path,
            draft_model=s.draft_model,
            draft_quant=s.draft_quant,
            act_quant=s.act_quant,
        )
        cache.make_room(s.cache_size)  # a --quant slice set it wrote (its runner holds it)
        close = engine.shutdown
    try:
        _generate(engine, s, params)
    finally:
        close()
    return 0


def _generate(engine, s: GenerateSettings, params: SamplingParams) -> None:
    tok = engine.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": s.prompt}]) if s.chat else s.prompt
    ids = tok.encode(text, add_special_tokens=not s.chat)
    t0, n, t_first = time.monotonic(), 0, None
    for ev in engine.generate_sync(ids, params):
        t_first = t_first or time.monotonic()
        n += 1
        sys.stdout.write(ev.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    dt = time.monotonic() - (t_first or t0)
    say(
        f"{len(ids)} prompt tokens, {n} generated; ttft {(t_first or t0) - t0:.3f} s, "
        f"{(n - 1) / dt if n > 1 and dt > 0 else 0:.1f} tokens/s"
    )
    for node, st in engine.driver.stats().items():
        parts = [f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in st.items()]
        say(f"node {node}: " + " ".join(parts))
