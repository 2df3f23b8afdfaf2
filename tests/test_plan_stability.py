"""The same machines and model give the same plan on every start (issue 18): whatever order the
workers join in, whatever noise their speed measurements carry; a real change of capacity may
change it. The plan names the shard caches, so a plan that wobbles re-slices and re-fetches."""

from __future__ import annotations

import itertools
import random
import re
import time

import pytest

from tests.cluster_procs import Node, free_port, wait_health
from tpi_node.cluster.membership import Member, Membership
from tpi_node.model.config import ModelConfig
from tpi_node.model.presets import get_preset
from tpi_node.weights.plan import NodeCapacity, capacity_weights, make_plan, speed_weight


def _cfg(kv: int = 8, layers: int = 4) -> ModelConfig:
    return ModelConfig.from_dict(
        dict(
            model_type="llama",
            vocab_size=100,
            hidden_size=512,
            intermediate_size=1536,
            num_hidden_layers=layers,
            num_attention_heads=2 * kv,
            num_key_value_heads=kv,
            head_dim=32,
        )
    )


def _member(node_id: str, speed: float) -> Member:
    return Member(NodeCapacity(node_id, 0, 2, 0, speed), f"addr-{node_id}")


def _propose(speeds: dict[str, float], order: list[str], cfg: ModelConfig | None = None):
    """The plan a master ("m", the first key) proposes once the workers joined in `order`."""
    cfg = cfg or _cfg()
    master, *_ = speeds
    m = Membership(cfg, "digest", "fp32", _member(master, speeds[master]), expected=len(speeds))
    for node_id in order:
        m.add(_member(node_id, speeds[node_id]))
    members, plan, _ = m.propose(m.members)
    return plan


def test_any_join_order_gives_the_same_plan():
    speeds = {"m": 1.0, "laptop": 1.0, "desk": 4.0, "jetson": 1.0}
    plans = {_propose(speeds, list(order)).digest for order in itertools.permutations(["laptop", "desk", "jetson"])}
    assert len(plans) == 1
    plan = _propose(speeds, ["jetson", "desk", "laptop"])
    assert [s.node_id for s in plan.shares] == ["m", "desk", "jetson", "laptop"]  # the master, then by id
    # a node that left and came back takes its old place: the same plan again
    m = Membership(_cfg(), "digest", "fp32", _member("m", 1.0), expected=3)
    for node_id in ("b", "a"):
        m.add(_member(node_id, 1.0))
    whole = m.propose(m.members)
    m.install(*whole)
    m.install(*m.propose(m.lose(["a"])))
    assert m.propose(m.members + [_member("a", 1.0)])[1] == whole[1]


@pytest.mark.parametrize(
    "true_speeds",
    [
        [1.0, 1.0],  # the case that went wrong: equal nodes on shared cores
        [1.0, 1.0, 1.0, 1.0],
        [1.0, 1.0, 4.0],  # a machine four times as fast
        [1.0, 16.0, 4.0],  # a GPU box, a desktop, a laptop
    ],
)
def test_speed_noise_of_30_percent_does_not_change_the_plan(true_speeds):
    cfg = _cfg()
    ids = ["m"] + [f"w{i}" for i in range(1, len(true_speeds))]
    want = _propose(dict(zip(ids, true_speeds)), ids[1:], cfg)
    rng = random.Random(0)
    corners = list(itertools.product([0.7, 1.3], repeat=len(true_speeds)))  # the worst cases
    noises = corners + [[rng.uniform(0.7, 1.3) for _ in true_speeds] for _ in range(300)]
    for noise in noises:
        measured = {i: s * n for i, s, n in zip(ids, true_speeds, noise)}
        assert _propose(measured, ids[1:], cfg) == want, (true_speeds, noise)


def test_equal_nodes_split_evenly_whatever_they_measured():
    # the reported failure: two equal nodes, the master measured ~1.9x the worker on shared cores
    # and took 6 of 8 KV heads
    plan = make_plan(_cfg(kv=8), [NodeCapacity("m", 0, speed=1.9), NodeCapacity("w", 0, speed=1.0)])
    assert [s.n_kv for s in plan.shares] == [4, 4]
    assert abs(plan.shares[0].n_ffn - plan.shares[1].n_ffn) <= 32


def test_a_real_change_of_capacity_changes_the_plan():
    cfg = _cfg(kv=8)
    before = make_plan(cfg, [NodeCapacity("m", 0, speed=1.0), NodeCapacity("w", 0, speed=1.0)])
    # twice as fast may or may not count (it is a step's edge); four times counts
    after = make_plan(cfg, [NodeCapacity("m", 0, speed=1.0), NodeCapacity("w", 0, speed=4.0)])
    assert after != before
    m, w = after.shares
    assert w.layer_params(cfg) > 3 * m.layer_params(cfg) and w.n_kv > m.n_kv
    assert [speed_weight(r) for r in (1.0, 1.99, 2.0, 2.01, 7.9, 8.1, 40.0)] == [1, 1, 1, 4, 4, 16, 64]
    # without a speed for every node, cores decide (whole numbers: no noise)
    assert capacity_weights([NodeCapacity("a", 0, 2), NodeCapacity("b", 0, 8, speed=3.0)]) == [2.0, 8.0]


def test_real_nodes_get_the_same_plan_in_either_join_order(tmp_path, tiny_model_dir):
    """Real `serve` and `join` processes: the two workers started in one order, then everything
    restarted with them in the other, give one plan. (Speeds are given: a measurement on this
    machine's two cores shared with the test's other processes is what the noise tests above
    model; here a 4x faster worker makes the shares differ per node.)"""
    model = tiny_model_dir("tiny-llama")
    speeds = {"a": "1", "b": "4"}
    digests = []
    for order in (("a", "b"), ("b", "a")):
        root = tmp_path / "".join(order)
        http, grpc_port = free_port(), free_port()
        serve = ["serve", "--model", str(model), "--port", str(http), "--grpc-port", str(grpc_port)]
        master = Node("master", root, [*serve, "--min-nodes", "3", "--node-id", "m", "--speed", "1"])
        nodes = [master]
        try:
            for i, node_id in enumerate(order):
                join = ["join", "--master", f"127.0.0.1:{grpc_port}", "--node-id", node_id, "--speed", speeds[node_id]]
                nodes.append(Node(node_id, root, join))
                _wait_log(master, f"node {node_id} joined ({i + 2} of 3)")
            wait_health(f"http://127.0.0.1:{http}", 3, 90, nodes)
            digests.append(re.search(r"plan (\w+) over 3 nodes: (.*)", master.log()).groups())
        finally:
            for n in nodes:
                n.stop()
    assert digests[0] == digests[1], digests
    assert digests[0][1].startswith("m: ") and ", a: " in digests[0][1] and ", b: " in digests[0][1]


def _wait_log(node: Node, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in node.log():
        assert node.alive() and time.monotonic() < deadline, node.log()[-2000:]
        time.sleep(0.05)


def test_membership_ranks_follow_node_ids_not_arrival():
    cfg = ModelConfig.from_dict(get_preset("tiny-llama"))
    m = Membership(cfg, "digest", "fp32", _member("zz-master", 1.0), expected=3)
    m.add(_member("b", 1.0))
    m.add(_member("a", 1.0))
    members, plan, _ = m.propose(m.members)
    assert [x.node_id for x in members] == ["zz-master", "a", "b"]  # the master stays rank 0
    assert [s.node_id for s in plan.shares] == ["zz-master", "a", "b"]
