"""Shared by the testbed tests: an OpenAI completion over plain HTTP and the loopback reference."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path


def completion(url: str, prompt: str, max_tokens: int, usage: bool = False):
    """A greedy /v1/completions through `url` (the served model, whatever its name): its text,
    or (text, completion tokens) with usage=True."""
    with urllib.request.urlopen(url + "/v1/models", timeout=30) as r:
        model = json.loads(r.read())["data"][0]["id"]
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        body = json.loads(r.read())
    text = body["choices"][0]["text"]
    return (text, body["usage"]["completion_tokens"]) if usage else text


def loopback_completion(model_dir: Path, prompt: str, max_tokens: int) -> str:
    """The same request served by one node on loopback: the reference a cluster must match."""
    from tests.api_helpers import local_engine, serve

    engine = local_engine(model_dir)
    try:
        with serve(engine) as url:
            return completion(url, prompt, max_tokens)
    finally:
        engine.shutdown()
