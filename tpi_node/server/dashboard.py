"""The master's dashboard: a static page at / that polls GET /cluster.json.

    app.include_router(dashboard_router(cluster_state))

`cluster_state()` returns a JSON-able dict (the same one `tpi-node status` prints):
    {"cluster": "default", "model": "...", "version": "0.1.0", "ready": true,
     "plan": {"digest": "...", "world_size": 3, "kv_heads": 4, "ffn": 1536},
     "throughput": {"completion_tokens": 1234, "tokens_per_s": 12.5, "running": 1, "waiting": 0},
     "nodes": [{"id", "role", "address", "kv": [start, end], "ffn": [start, end],
                "memory_budget": bytes|null, "window": layers|null, "state": "ready",
                "last_heartbeat_s": seconds ago|null, "tokens_per_s": float|null}, ...]}
Every field is optional for the page; the route adds `time` (server clock) for rate estimates.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from fastapi import APIRouter, Depends
from fastapi.responses import HTMLResponse, JSONResponse

PAGE = Path(__file__).with_name("static") / "dashboard.html"


def dashboard_router(cluster_state: Callable[[], dict], auth: Callable | None = None) -> APIRouter:
    """`auth`: the API key check (server/app.py api_key_check) that guards the cluster's state;
    the page itself holds no data (it asks for the key when /cluster.json answers 401)."""
    router = APIRouter(include_in_schema=False)
    html = PAGE.read_text(encoding="utf-8")

    @router.get("/", response_class=HTMLResponse)
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    @router.get("/cluster.json", dependencies=[Depends(auth)] if auth is not None else [])
    async def cluster_json() -> JSONResponse:
        state = dict(cluster_state())
        state["time"] = time.time()
        return JSONResponse(state, headers={"Cache-Control": "no-store"})

    return router
