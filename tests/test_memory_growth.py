"""A long-running daemon must not grow with its requests: 500 short requests (completions, chat,
streamed and not) to a real two-node cluster (`tpi-node serve` + `tpi-node join` processes);
after a warm-up the master's and the worker's RSS stay flat."""

from __future__ import annotations

import psutil

try:
    import httpx
except ImportError:  # newer openai releases ship httpx as httpx2
    import httpx2 as httpx

from tests.cluster_procs import Node, free_port, wait_health

WARMUP, REQUESTS = 100, 500
BOUND = 20 * 2**20  # bytes of growth allowed after the warm-up (allocator noise, not per request)


def _request(client: httpx.Client, model: str, i: int) -> None:
    """Request i: chat for odd i, completions for even; every other one of each streamed."""
    stream = i % 4 in (0, 1)
    body = {"model": model, "max_tokens": 2, "temperature": 0.7, "seed": i, "stream": stream}
    if i % 2:
        r = client.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": f"hi {i}"}]})
    else:
        r = client.post("/v1/completions", json={**body, "prompt": f"count {i}"})
    assert r.status_code == 200, r.text
    assert r.text.rstrip().endswith("data: [DONE]") if stream else r.json()["usage"]["completion_tokens"] >= 1


def _rss(node: Node) -> int:
    return psutil.Process(node.proc.pid).memory_info().rss


def test_500_requests_leave_the_master_and_worker_rss_flat(tmp_path, tiny_model_dir):
    model = tiny_model_dir("tiny-llama")
    http, grpc_port = free_port(), free_port()
    master = Node(
        "master",
        tmp_path,
        [
            "serve",
            "--model",
            str(model),
            "--port",
            str(http),
            "--grpc-port",
            str(grpc_port),
            "--min-nodes",
            "2",
            "--device",
            "cpu",
        ],
    )
    worker = Node("worker", tmp_path, ["join", "--master", f"127.0.0.1:{grpc_port}", "--device", "cpu"])
    url = f"http://127.0.0.1:{http}"
    try:
        wait_health(url, 2, 120, [master, worker])
        with httpx.Client(base_url=url, timeout=30) as client:
            name = client.get("/v1/models").json()["data"][0]["id"]
            for i in range(WARMUP):
                _request(client, name, i)
            before = _rss(master), _rss(worker)
            for i in range(WARMUP, WARMUP + REQUESTS):
                _request(client, name, i)
            after = _rss(master), _rss(worker)
            stats = client.get("/cluster.json").json()["throughput"]
        assert stats["requests"] == WARMUP + REQUESTS and stats["failed"] == 0
        growth = [a - b for a, b in zip(after, before)]
        print(
            f"\nrss growth over {REQUESTS} requests: master {growth[0] / 2**20:+.1f} MiB, "
            f"worker {growth[1] / 2**20:+.1f} MiB"
        )
        assert growth[0] < BOUND, f"master grew {growth[0] / 2**20:.1f} MiB over {REQUESTS} requests"
        assert growth[1] < BOUND, f"worker grew {growth[1] / 2**20:.1f} MiB over {REQUESTS} requests"
    finally:
        worker.stop()
        master.stop()
