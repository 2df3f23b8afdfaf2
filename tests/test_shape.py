"""The code's shape as a contract: every setting declared once and merged one way, membership as
one owner with an explicit state, and the layer rules (import-linter) as part of the suite."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from tpi_node.cluster.membership import ClusterState, Member, Membership
from tpi_node.errors import UserError
from tpi_node.model.config import ModelConfig
from tpi_node.model.presets import get_preset
from tpi_node.settings import (
    GenerateSettings,
    JoinSettings,
    ServeSettings,
    declared_fields,
    env_name,
    families,
    load,
    option_string,
)
from tpi_node.weights.plan import NodeCapacity, PlanError

ROOT = Path(__file__).resolve().parents[1]


# ---- settings ------------------------------------------------------------------------------------
def test_every_setting_is_declared_in_one_place_with_one_env_name():
    declared_in: dict[str, set[type]] = defaultdict(set)
    envs: dict[str, set[str]] = defaultdict(set)
    for family in families():
        for group, f in declared_fields(family):
            declared_in[f.name].add(group)
            envs[env_name(f)].add(f.name)
    twice = {name: groups for name, groups in declared_in.items() if len(groups) > 1}
    assert not twice, twice
    assert all(len(names) == 1 for names in envs.values()), envs
    # the ones the issue named, each shared by the commands that take it
    for name in ("node_id", "token", "speed", "memory_budget"):
        assert len(declared_in[name]) == 1
    token = next(f for _, f in declared_fields(JoinSettings) if f.name == "token")
    assert env_name(token) == "TPI_CLUSTER_TOKEN" and option_string(token) == "--token"


def test_flags_beat_the_environment_which_beats_the_file_which_beats_the_default(tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("model: from-file\nport: 9001\nmin-nodes: 4\nauto_admit: true\n")
    env = {"TPI_PORT": "9002", "TPI_MEMORY_BUDGET": "1GiB", "TPI_CONFIG": str(cfg)}
    s = load(ServeSettings, {"port": 9003}, env)
    assert s.port == 9003  # flag
    assert s.memory_budget == 2**30  # environment, through the flag's own converter
    assert s.model == "from-file" and s.min_nodes == 4 and s.auto_admit is True  # file
    assert s.wire == "fp32" and s.grpc_port is None  # defaults
    assert load(ServeSettings, {}, {k: v for k, v in env.items() if k != "TPI_PORT"}).port == 9001
    with pytest.raises(dataclasses_frozen()):
        s.port = 1  # frozen: one value, read everywhere


def dataclasses_frozen():
    import dataclasses

    return dataclasses.FrozenInstanceError


@pytest.mark.parametrize(
    "family, env, needle",
    [
        (ServeSettings, {"TPI_PORT": "eighty"}, "TPI_PORT: 'eighty' is not a port number"),
        (ServeSettings, {"TPI_WIRE": "fp8"}, "TPI_WIRE: 'fp8' is not one of fp32, bf16, fp16"),
        (ServeSettings, {"TPI_AUTO_ADMIT": "maybe"}, "is not a boolean"),
        (JoinSettings, {"TPI_MEMORY_BUDGET": "lots"}, "bad memory size"),
        (GenerateSettings, {"TPI_MAX_TOKENS": "0"}, "must be at least 1"),
    ],
)
def test_a_bad_value_from_the_environment_is_one_clear_line(family, env, needle):
    with pytest.raises(UserError) as e:
        load(family, {}, env)
    msg = str(e.value)
    assert msg.startswith(next(iter(env)) + ": ") and needle in msg and "\n" not in msg


def test_an_unknown_key_in_the_file_is_refused(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: x\nmin_nodez: 3\n")
    with pytest.raises(UserError, match="unknown setting.*min_nodez"):
        load(ServeSettings, {"config": str(cfg)}, {})


def test_the_cli_reads_a_setting_from_the_environment_too():
    """TPI_* reaches a command that never had a config merger before (generate)."""
    env = {"TPI_MAX_TOKENS": "zero", "PATH": "/usr/bin:/bin"}
    r = subprocess.run(
        [sys.executable, "-m", "tpi_node.cli", "generate", "--prompt", "hi"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
    )
    assert r.returncode == 2 and "TPI_MAX_TOKENS: 'zero' is not a whole number" in r.stderr, r.stderr


# ---- membership -----------------------------------------------------------------------------------
def _member(node_id: str, speed: float = 1.0) -> Member:
    return Member(NodeCapacity(node_id, 0, 1, 0, speed), f"addr-{node_id}")


@pytest.fixture
def membership():
    cfg = ModelConfig.from_dict(get_preset("tiny-llama"))
    return Membership(cfg, "digest", "fp32", _member("m", 2.0), expected=3)


def test_membership_forms_replans_and_gets_its_old_plan_back(membership):
    m = membership
    assert m.state is ClusterState.WAITING
    m.add(_member("a"))
    m.add(_member("b"))
    assert len(m.members) == m.expected
    members, plan, windows = m.propose(m.members)
    m.install(members, plan, windows)
    assert m.state is ClusterState.READY and m.replans == 0 and m.rank_of("b") == 2
    whole = plan.digest

    survivors = m.lose(["a"])
    assert [x.node_id for x in survivors] == ["m", "b"] and [x.node_id for x in m.lost] == ["a"]
    assert m.may_admit("a") and not m.may_admit("stranger")  # a former member is welcome
    m.install(*m.propose(survivors))
    assert m.replans == 1 and m.plan.world_size == 2 and m.rank_of("a") is None and m.lost

    # "a" returns (listed last): ranks by node id put it back in its old place, so the plan is the old one
    m.install(*m.propose(survivors + [_member("a")]))
    assert m.plan.digest == whole and not m.lost and m.rank_of("a") == 1


def test_membership_admission_queue_and_states(membership):
    m = membership
    m.install(*m.propose([m.members[0], _member("a"), _member("b")]))
    ev = asyncio.new_event_loop().run_until_complete(_queue(m, _member("c")))
    assert not ev.is_set() and set(m.pending) == {"c"}
    waiting, members = m.with_pending({"m", "a", "b"})
    assert set(waiting) == {"c"} and [x.node_id for x in members] == ["m", "a", "b", "c"]
    m.fail(ClusterState.UNSERVABLE, "too small")
    assert m.may_admit("anyone")  # a cluster that cannot serve takes any node that makes it whole
    assert {s.value for s in ClusterState} >= {"ready", "replanning", "not enough nodes", "waiting for nodes"}


async def _queue(m: Membership, member: Member) -> asyncio.Event:
    return m.wait_for_admission(member)


def test_membership_refuses_a_plan_the_members_cannot_hold(membership):
    tiny = Member(NodeCapacity("tiny", 1024, 1, 0, 1.0), "x")  # 1 KiB of memory
    with pytest.raises(PlanError):
        membership.propose([membership.members[0], tiny])
    assert membership.plan is None and membership.state is ClusterState.WAITING  # nothing changed


# ---- layers -----------------------------------------------------------------------------------------
def test_layers_import_only_downward_and_no_package_has_a_cycle():
    exe = Path(sys.executable).with_name("lint-imports")
    r = subprocess.run([str(exe)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:]
    assert "2 kept, 0 broken" in r.stdout
