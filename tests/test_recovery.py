"""Recovery (issue 18, items 4 and 6). A shard file that goes bad under a running store is read
again, fetched again, and only then fails the node (the master re-plans around it); a worker
whose master went away looks for it again and rejoins with its cache.

The store tests heal real files through a refetch that copies the good file back (what the
worker's refetch does over FetchShard); the cluster tests run real `tpi-node` processes."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc

try:
    import httpx
except ImportError:  # newer openai releases ship httpx as httpx2
    import httpx2 as httpx
import pytest
import torch

from tests.cluster_procs import Node, free_port, wait_health
from tpi_node.cluster.discovery import DiscoveryError
from tpi_node.cluster.worker import MasterRetry, WorkerSpec
from tpi_node.errors import UserError
from tpi_node.model.config import ModelConfig
from tpi_node.weights.plan import NodeCapacity, make_plan
from tpi_node.weights.slicer import layer_file, write_node_shards
from tpi_node.weights.store import ShardError, ShardRepair, ShardStore

PROMPT = "The three primary colors are"


# ---- the store heals its files --------------------------------------------------------------
@pytest.fixture()
def shards(tiny_model_dir, tmp_path, monkeypatch):
    """(master's copy, worker's cache, cfg, share, sha256s) of a 4-layer model's single slice."""
    monkeypatch.setenv("TPI_PREPACK", "0")  # resident weights as read, to compare with streamed ones
    model = tiny_model_dir("tiny-llama")
    cfg = ModelConfig.from_dir(model)
    plan = make_plan(cfg, [NodeCapacity("solo", 2**30)], "tiny")
    src = tmp_path / "master"
    sums = write_node_shards(model, cfg, plan, 0, src, progress=False)
    cache = tmp_path / "worker"
    shutil.copytree(src, cache)
    return src, cache, cfg, plan.share_of(0), sums


class CopyBack:
    """A refetch that puts the master's copy in place as the worker's does (write, then rename),
    recording which file it was asked for and on which thread."""

    def __init__(self, src: Path, dst: Path) -> None:
        self.src, self.dst, self.calls, self.threads = src, dst, [], set()

    def __call__(self, name: str) -> None:
        self.calls.append(name)
        self.threads.add(threading.current_thread().name)
        shutil.copyfile(self.src / name, self.dst / f"{name}.part")
        os.replace(self.dst / f"{name}.part", self.dst / name)


def _scribble(path: Path, at: float = 0.6, n: int = 4096) -> None:
    """Overwrite n bytes inside the tensor data, in place: the header still parses."""
    with open(path, "r+b") as f:
        size = f.seek(0, 2)
        f.seek(int(size * at))
        f.write(os.urandom(n))


def _walk(store: ShardStore, layers: int) -> list[torch.Tensor]:
    out = []
    for i in range(layers):
        with store.layer(i) as w:
            out.append(w.w13.clone())
    return out


def test_a_layer_file_changed_while_streaming_is_fetched_again_and_read_right(shards):
    src, cache, cfg, share, sums = shards
    good = ShardStore(src, cfg, share)
    want = _walk(good, cfg.num_layers)
    refetch = CopyBack(src, cache)
    store = ShardStore(cache, cfg, share, window=2, repair=ShardRepair(sums, refetch))
    assert store.streaming
    for got, w in zip(_walk(store, cfg.num_layers), want):
        assert torch.equal(got, w)
    assert refetch.calls == []  # unchanged files cost one os.stat per load, no hash, no fetch

    store.settle()  # layers 0 and 1 are in the window again: the next walk reads 2 and 3 from disk
    _scribble(cache / layer_file(2))  # parses fine: only the changed stat tells
    for got, w in zip(_walk(store, cfg.num_layers), want):
        assert torch.equal(got, w)
    assert refetch.calls == [layer_file(2)]
    # the prefetcher asked; the thread that walks the layers (the worker's, owning its gRPC loop) fetched
    assert refetch.threads == {threading.current_thread().name}

    (cache / layer_file(3)).unlink()  # gone: read fails twice, then it is fetched again
    for got, w in zip(_walk(store, cfg.num_layers), want):
        assert torch.equal(got, w)
    assert refetch.calls == [layer_file(2), layer_file(3)]
    store.close()
    good.close()


def test_a_file_even_the_master_cannot_heal_fails_the_load_with_a_clear_error(shards):
    src, cache, cfg, share, sums = shards
    refetch = CopyBack(src, cache)
    store = ShardStore(cache, cfg, share, window=2, repair=ShardRepair(sums, refetch))
    _walk(store, cfg.num_layers)
    store.settle()
    _scribble(src / layer_file(2))  # the copy it fetches again is bad too
    _scribble(cache / layer_file(2))
    with pytest.raises(
        ShardError,
        match=r"layer-002.safetensors is still unusable after fetching it again: .*no longer matches its sha",
    ):
        _walk(store, cfg.num_layers)
    assert refetch.calls == [layer_file(2)]  # fetched once, not in a loop
    store.close()

    def unreachable(name: str) -> None:
        raise ShardError(f"{name} from the master does not match its sha256; the master's cache is corrupt")

    (cache / layer_file(0)).unlink()  # a resident store heals (or fails) as it opens
    with pytest.raises(ShardError, match="the master's cache is corrupt"):
        ShardStore(cache, cfg, share, repair=ShardRepair(sums, unreachable))


# ---- a worker looks for a lost master again -------------------------------------------------
def _spec(**kw) -> WorkerSpec:
    return WorkerSpec("127.0.0.1:1", "w", NodeCapacity("w", 2**30), **kw)


def test_a_lost_master_is_looked_for_again_until_it_answers_or_the_wait_ends(capfd):
    server = grpc.server(futures.ThreadPoolExecutor(1))  # any gRPC server answers a dial
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    found = iter([DiscoveryError("no master of cluster 'c' found"), f"127.0.0.1:{port}"])

    def rediscover() -> str:
        x = next(found)
        if isinstance(x, Exception):
            raise x
        return x

    try:
        link = MasterRetry(_spec(master_retry_s=60, rediscover=rediscover)).reconnect("lost the master")
        assert link.address == f"127.0.0.1:{port}"
        link.close()
        err = capfd.readouterr().err
        assert "looking for it again for up to 60 s" in err and "no master of cluster 'c' found" in err
    finally:
        server.stop(0)

    with pytest.raises(UserError, match="did not come back within 1 s"):
        MasterRetry(_spec(master_retry_s=1)).reconnect("lost the master")  # port 1: nobody there
    with pytest.raises(UserError, match="not waiting for it to come back"):
        MasterRetry(_spec(master_retry_s=0)).reconnect("lost the master")


# ---- real processes ----------------------------------------------------------------------------
def _complete(url: str, max_tokens: int = 12) -> str:
    model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _serve(model: Path, tmp: Path, nodes: int, http: int, grpc: int, extra: list[str] = ()) -> Node:
    # a fixed budget and speed: a restarted master reports the capacity it had, for the same plan
    argv = ["serve", "--model", str(model), "--port", str(http), "--grpc-port", str(grpc), *extra]
    return Node("master", tmp, argv + ["--min-nodes", str(nodes), "--memory-budget", "1GiB", "--speed", "1"])


def test_a_shard_corrupted_while_serving_is_fetched_again_then_an_unhealable_one_fails_the_node(smollm2_dir, tmp_path):
    http, grpc = free_port(), free_port()
    url = f"http://127.0.0.1:{http}"
    master = _serve(smollm2_dir, tmp_path, 2, http, grpc)
    # 405 MiB: the worker's layers stream through a small window, so every token reads them again
    join = ["join", "--master", f"127.0.0.1:{grpc}", "--memory-budget", "405MiB", "--speed", "1"]
    worker = Node("worker", tmp_path, join)
    try:
        wait_health(url, 2, 120, [master, worker])
        assert re.search(r"memory: window \d+ layers", worker.log()), worker.log()[-2000:]
        want = _complete(url)
        victim = next(worker.home.rglob(layer_file(7)))
        sha = _sha(victim)
        _scribble(victim)
        assert _complete(url) == want  # the next request: the same text
        assert f"{layer_file(7)}: replaced with a good copy" in worker.log(), worker.log()[-3000:]
        assert _sha(victim) == sha and worker.alive() and "re-planning" not in master.log()

        # the master's own copy goes bad too: the worker cannot heal, says why, and leaves;
        # the master re-plans around it and the request still gets its text
        source = next(p for p in master.home.rglob(layer_file(7)) if _sha(p) == sha)
        _scribble(source)
        _scribble(victim)
        assert _complete(url) == want
        assert worker.wait_exit(30) == 2
        assert "this node cannot load its slice of the model" in worker.log(), worker.log()[-3000:]
        assert "the master's cache is corrupt" in worker.log()
        assert "re-planning (lost" in master.log() and "reported an error" in master.log(), master.log()[-3000:]
    finally:
        worker.stop()
        master.stop()


def test_a_restarted_master_finds_its_workers_serving_within_30s_with_nothing_fetched(smollm2_dir, tmp_path):
    http, grpc = free_port(), free_port()
    url = f"http://127.0.0.1:{http}"
    master = _serve(smollm2_dir, tmp_path, 3, http, grpc)
    join = ["join", "--master", f"127.0.0.1:{grpc}", "--memory-budget", "1GiB", "--speed", "1"]
    workers = [Node(f"worker{i}", tmp_path, join) for i in (1, 2)]
    try:
        wait_health(url, 3, 120, [master, *workers])
        want = _complete(url)
        pids = [w.proc.pid for w in workers]
        master.kill9()
        for w in workers:  # they notice, and keep looking
            deadline = time.monotonic() + 30
            while "looking for it again" not in w.log():
                assert time.monotonic() < deadline and w.alive(), w.log()[-2000:]
                time.sleep(0.2)
        t0 = time.monotonic()
        master.start()
        wait_health(url, 3, 120, [master, *workers])
        back = time.monotonic() - t0
        assert _complete(url) == want
        print(f"\nmaster restarted: the cluster of 3 serves again {back:.1f} s after the restart began")
        assert back < 30, master.log()[-3000:]
        assert [w.proc.pid for w in workers] == pids  # the same worker processes, untouched
        for w in workers:
            fetches = re.findall(r"shards: fetched (\d+) files", w.log())
            assert len(fetches) == 2 and fetches[1] == "0", w.log()[-3000:]  # rejoined with its cache
    finally:
        for w in workers:
            w.stop()
        master.stop()


def test_a_returning_worker_is_admitted_while_requests_never_stop(smollm2_dir, tmp_path):
    """Two clients keep a sequence running at every moment: the worker that comes back is still
    taken in (after --admit-busy-after, between two steps), and every request keeps its text."""
    http, grpc = free_port(), free_port()
    url = f"http://127.0.0.1:{http}"
    master = _serve(smollm2_dir, tmp_path, 2, http, grpc, ["--admit-busy-after", "3"])
    join = ["join", "--master", f"127.0.0.1:{grpc}", "--memory-budget", "1GiB", "--speed", "1"]
    worker = Node("worker", tmp_path, join)
    texts, stop = [], threading.Event()

    def client(delay: float) -> None:
        time.sleep(delay)  # staggered: one of the two is always mid-request
        while not stop.is_set():
            texts.append(_complete(url, 24))

    try:
        wait_health(url, 2, 120, [master, worker])
        want = _complete(url, 24)
        worker.kill9()
        assert _complete(url, 24) == want  # the master re-plans alone
        clients = [threading.Thread(target=client, args=(d,), daemon=True) for d in (0.0, 0.7)]
        for c in clients:
            c.start()
        worker.start()
        deadline = time.monotonic() + 90
        while "re-planning (admitting" not in master.log():
            assert time.monotonic() < deadline and worker.alive(), master.log()[-3000:]
            time.sleep(0.5)
        wait_health(url, 2, 60, [master, worker])
        n = len(texts)
        while len(texts) < n + 2:  # requests on the new plan
            assert time.monotonic() < deadline + 60
            time.sleep(0.2)
        stop.set()
        for c in clients:
            c.join(120)
        assert texts and all(t == want for t in texts), texts
    finally:
        stop.set()
        worker.stop()
        master.stop()


@pytest.mark.root
def test_a_master_found_by_mdns_is_found_again_when_it_comes_back_elsewhere(tiny_model_dir, tmp_path):
    """Emulated LAN (tests/netns_lan.py): the master is killed and started again on another
    machine (namespace, address); the worker, which found it by mDNS, finds it there again."""
    from tests.netns_lan import Lan
    from tests.test_netns_cluster import CLIENT, _in_ns

    why = Lan.unavailable()
    if why:
        pytest.skip(why)
    model = str(tiny_model_dir("tiny-llama3"))
    http, grpc_port = 18000, 50051
    serve = ["serve", "--model", model, "--host", "0.0.0.0", "--port", str(http), "--grpc-port", str(grpc_port)]
    serve += ["--min-nodes", "2", "--cluster", "rec", "--memory-budget", "1GiB", "--speed", "1"]
    join = ["join", "--cluster", "rec", "--discover-timeout", "3", "--memory-budget", "1GiB", "--speed", "1"]
    with Lan(3) as lan:
        master = Node("master", tmp_path, serve, wrap=lan.cmd(0, []))
        worker = Node("worker", tmp_path, join, wrap=lan.cmd(1, []))
        try:
            first = json.loads(_in_ns(lan, 0, CLIENT, f"http://127.0.0.1:{http}", "2", "90"))
            assert "error" not in first, (first, worker.log()[-2000:], master.log()[-2000:])
            master.kill9()
            master.wrap = lan.cmd(2, [])  # the same node (its TPI_HOME), another address
            master.start()
            again = json.loads(_in_ns(lan, 2, CLIENT, f"http://127.0.0.1:{http}", "2", "90"))
            assert "error" not in again, (again, worker.log()[-2000:], master.log()[-2000:])
            assert again["text"] == first["text"]
            log = worker.log()
            assert f"the master answers at {lan.ip(2)}:{grpc_port}" in log, log[-2000:]
            assert re.findall(r"shards: fetched (\d+) files", log)[1:] == ["0"], log[-2000:]
        finally:
            worker.stop()
            master.stop()
