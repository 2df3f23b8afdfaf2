"""Shared pieces of the HTTP API tests: a tiny model, a real engine, a real uvicorn server."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from tpi_node.commands.compose import build_local_engine
from tpi_node.engine.engine import Engine
from tpi_node.engine.limits import EngineLimits
from tpi_node.model.sampling_params import SamplingParams
from tpi_node.server.app import create_app
from tpi_node.server.runner import ServerThread

MODEL = "tiny-llama"


def tiny_model(_tmp_path_factory=None) -> Path:
    """The tiny random model directory (synthesized once per session by conftest)."""
    from tests.conftest import tiny_model_dir

    return Path(tiny_model_dir(MODEL))


def local_engine(model_dir: Path, limits: EngineLimits | None = None, **kwargs) -> Engine:
    return build_local_engine(model_dir, progress=False, limits=limits, **kwargs)


@contextlib.contextmanager
def serve(engine, **kwargs):
    """A real uvicorn server over `engine` on a free loopback port; yields the base URL."""
    kwargs.setdefault("model_name", engine.model_name)
    app = create_app(engine, engine.tokenizer, **kwargs)
    server = ServerThread(app)
    url = server.start()
    try:
        yield url
    finally:
        server.stop()


def chat_prompt_ids(engine, messages: list[dict]) -> list[int]:
    tok = engine.tokenizer
    return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)


def engine_run(engine, prompt_ids: list[int], **params):
    """(text, token ids, finish_reason) straight from the engine, bypassing HTTP."""
    events = list(engine.generate_sync(prompt_ids, SamplingParams(**params)))
    return "".join(e.text for e in events), [e.token_id for e in events], events[-1].finish_reason


def wait_until(cond, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def engine_idle(engine) -> bool:
    s = engine.stats()
    return s["waiting"] == 0 and s["running"] == 0 and s["kv"]["used"] == 0  # no sequence holds a KV block
