"""The star allreduce between real processes on loopback: the hub runs in the test process, every
spoke is a spawned process with its session on real gRPC or, as workers on the master's machine
have it, on the hub's Unix socket (cluster/unix_session.py): every test runs on both."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import random
import signal
import socket
import struct
import time

import pytest
import torch

from tpi_node.cluster.link import MasterLink, join_star
from tpi_node.cluster.star_server import StarServer
from tpi_node.cluster.unix_session import is_loopback
from tpi_node.comm.codec import FrameError, to_pb, wire_dtype
from tpi_node.comm.star import PeerLost, StepAborted
from tpi_node.proto import tpi_pb2 as pb

H = 576


def _value(rank: int, i: int, tokens: int) -> torch.Tensor:
    """What rank contributes to allreduce i: distinct per rank, element and call."""
    g = torch.Generator().manual_seed(1000 * i + rank)
    return torch.randn(tokens, H, generator=g)


def _expected(world: int, i: int, tokens: int) -> torch.Tensor:
    return sum(_value(r, i, tokens) for r in range(world))


def _join(addr, rank, world, wire="fp32"):
    """addr: (gRPC address, the hub's Unix socket or "")."""
    return join_star(addr[0], rank, world, wire, unix_path=addr[1])


def _spoke(addr, rank, world, wire, calls, tokens, jitter, q):
    torch.set_num_threads(1)
    try:
        s = _join(addr, rank, world, wire)
        rnd = random.Random(rank)
        worst = 0.0
        for i in range(calls):
            if i % 4 == 0:
                s.begin_step(i // 4)
            time.sleep(rnd.random() * jitter)  # uneven timing between nodes
            got = s.allreduce(_value(rank, i, tokens))
            want = _expected(world, i, tokens)
            if wire != "fp32":
                want = want.to(wire_dtype(wire)).float()
            worst = max(worst, (got - want).abs().max().item())
        q.put(("ok", rank, worst))
        time.sleep(0.5)
        s.link.close()
    except Exception as e:
        q.put(("error", rank, f"{type(e).__name__}: {e}"))


def _bad_spoke(addr, rank, world, q):
    """Sends a partial whose byte length does not match its shape; reports what the master says."""
    link = MasterLink(addr[0])
    link.open_session(pb.Hello(node_id="bad", rank=rank), addr[1])
    msg = pb.WorkerMsg(partial=pb.Partial(step_id=0, stage=0, tensor=to_pb(torch.zeros(1, H))))
    msg.partial.tensor.data = msg.partial.tensor.data[:-4]
    link.run(link.send(msg))
    reply = link.run(link.recv(10.0))
    q.put(reply.WhichOneof("kind") + ": " + (reply.shutdown.reason if reply else ""))


def _idle_spoke(addr, rank, world):
    spoke = _join(addr, rank, world)  # held: a Unix socket closes with its last reference
    time.sleep(60)
    spoke.link.close()


@pytest.fixture(params=["grpc", "unix"])
def hub_factory(request, tmp_path):
    made = []

    def make(world, wire="fp32", timeout_s=5.0):
        unix_dir = str(tmp_path) if request.param == "unix" else ""
        server = StarServer(world, "127.0.0.1:0", wire, timeout_s, unix_dir=unix_dir)
        made.append(server)
        return server, (f"127.0.0.1:{server.port}", server.socket_path)

    yield make
    for server in made:
        server.close()


def _start(target, *args):
    p = mp.get_context("spawn").Process(target=target, args=args, daemon=True)
    p.start()
    return p


@pytest.mark.parametrize("world, wire, tokens", [(3, "fp32", 1), (3, "bf16", 16), (2, "fp16", 3)])
def test_sums_are_correct_with_uneven_timing(hub_factory, world, wire, tokens):
    server, addr = hub_factory(world, wire)
    q = mp.get_context("spawn").Queue()
    procs = [_start(_spoke, addr, r, world, wire, 12, tokens, 0.02 * r, q) for r in range(1, world)]
    server.wait_for_peers()
    hub = server.hub
    rnd = random.Random(0)
    for i in range(12):
        if i % 4 == 0:
            hub.begin_step(i // 4)
        time.sleep(rnd.random() * 0.02)
        got = hub.allreduce(_value(0, i, tokens))
        want = _expected(world, i, tokens)
        tol = 1e-4 if wire == "fp32" else 0.0
        if wire != "fp32":
            want = want.to(wire_dtype(wire)).float()
        assert got.dtype == torch.float32 and got.shape == (tokens, H)
        # The master sums in fp32 in rank order; spokes sum nothing. bf16/fp16: all see the same
        # rounded sum (within one rounding step of the exact one).
        assert torch.allclose(got, want, atol=tol + (0.1 if wire != "fp32" else 0), rtol=1e-2 if wire != "fp32" else 0)
    server.shared.run(asyncio.sleep(0.1))
    results = [q.get(timeout=30) for _ in range(world - 1)]
    for status, rank, worst in results:
        assert status == "ok", worst
        assert worst <= (1e-4 if wire == "fp32" else 0.1), (rank, worst)
    for p in procs:
        p.join(timeout=10)


def test_every_node_sees_the_identical_rounded_sum_on_a_bf16_wire(hub_factory):
    server, addr = hub_factory(2, "bf16")
    q = mp.get_context("spawn").Queue()
    p = _start(_spoke, addr, 1, 2, "bf16", 4, 5, 0.0, q)
    server.wait_for_peers()
    hub = server.hub
    for i in range(4):
        if i % 4 == 0:
            hub.begin_step(0)
        got = hub.allreduce(_value(0, i, 5))
        exact = _value(0, i, 5) + _value(1, i, 5).to(torch.bfloat16).float()
        assert torch.equal(got, exact.to(torch.bfloat16).float())
    assert q.get(timeout=30)[2] < 0.1
    p.join(timeout=10)


def test_a_malformed_frame_is_refused_with_a_message_on_both_sides(hub_factory):
    server, addr = hub_factory(2)
    q = mp.get_context("spawn").Queue()
    p = _start(_bad_spoke, addr, 1, 2, q)
    server.wait_for_peers()
    hub = server.hub
    hub.begin_step(0)
    with pytest.raises(FrameError, match=r"malformed frame from node bad \(rank 1\): partial: 2300 bytes"):
        hub.allreduce(torch.zeros(1, H))
    told = q.get(timeout=10)
    assert told.startswith("shutdown: malformed frame") and "2300 bytes for shape [1, 576]" in told
    p.join(timeout=10)


def test_a_killed_spoke_gives_peer_lost_from_its_broken_stream(hub_factory):
    """A killed process is noticed by its stream breaking, at once: not by the partial-sum timeout
    (an hour here, so only the broken stream can have ended the wait)."""
    server, addr = hub_factory(3, timeout_s=3600.0)
    procs = [_start(_idle_spoke, addr, r, 3) for r in (1, 2)]
    server.wait_for_peers()
    hub = server.hub
    os.kill(procs[1].pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(PeerLost, match=r"\(rank 2\) disconnected"):
        hub.begin_step(0)
        hub.allreduce(torch.zeros(1, H))
    print(f"\nkilled spoke noticed after {time.monotonic() - t0:.2f} s")
    procs[0].kill()


def test_a_frozen_spoke_gives_peer_lost_after_the_timeout(hub_factory):
    server, addr = hub_factory(2, timeout_s=1.5)
    p = _start(_idle_spoke, addr, 1, 2)
    server.wait_for_peers()
    hub = server.hub
    os.kill(p.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(PeerLost, match=r"sent no partial sum for step 0 stage 0 within 1.5 s"):
            hub.allreduce(torch.zeros(1, H))
        # not before the timeout (how long after it depends on how busy the machine is)
        assert time.monotonic() - t0 > 1.4
    finally:
        os.kill(p.pid, signal.SIGKILL)


def test_a_stale_frame_is_detected(hub_factory):
    server, addr = hub_factory(2)
    q = mp.get_context("spawn").Queue()
    p = _start(_spoke, addr, 1, 2, "fp32", 1, 1, 0.0, q)  # sends step 0 stage 0
    server.wait_for_peers()
    hub = server.hub
    hub.begin_step(0)
    hub.stage = 1  # the master is one allreduce ahead
    with pytest.raises(FrameError, match="step 0 stage 0 while step 0 stage 1"):
        hub.allreduce(torch.zeros(1, H))
    p.kill()


def _free_port_pair() -> tuple[int, int]:
    socks = [socket.socket() for _ in range(2)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = tuple(s.getsockname()[1] for s in socks)
    for s in socks:
        s.close()
    return ports


@pytest.mark.parametrize(
    "garbage, why",
    [
        (struct.pack("<I", (1 << 30) + 1), "a frame of 1073741825 bytes"),
        (struct.pack("<I", 3) + b"\xff\xff\xff", "3 bytes that are not a WorkerMsg"),
    ],
)
def test_a_unix_session_sending_bytes_that_are_no_frame_is_ended_and_the_step_fails(tmp_path, garbage, why):
    server = StarServer(2, "127.0.0.1:0", unix_dir=str(tmp_path))
    try:
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(server.socket_path)
            hello = pb.WorkerMsg(hello=pb.Hello(node_id="raw", rank=1)).SerializeToString()
            c.sendall(struct.pack("<I", len(hello)) + hello)
            server.wait_for_peers()
            c.sendall(garbage)
            server.hub.begin_step(0)
            with pytest.raises(PeerLost, match=rf"node raw \(rank 1\) sent a malformed frame: {why}"):
                server.hub.allreduce(torch.zeros(1, H))
            c.settimeout(5)
            assert c.recv(1) == b""  # the master closed the socket
    finally:
        server.close()


@pytest.mark.parametrize(
    "address, loopback",
    [("127.0.0.1:7070", True), ("localhost:7070", True), ("[::1]:7070", True), ("127.3.4.5", True)]
    + [("0.0.0.0:7070", True), ("[::]:7070", True)]
    + [("10.0.0.2:7070", False), ("[fe80::1]:7070", False), ("master.lan:7070", False)],
)
def test_only_a_loopback_master_is_offered_the_unix_socket(address, loopback):
    assert is_loopback(address) is loopback


# ---- shared-memory lanes (comm/lane.py): a worker on the master's machine --------------------------


def _lane_spoke(addr, q, sizes):
    """Allreduces of `sizes` tokens, two at a time in flight (the token split's shape), so a lane's
    entry and a frame can be in flight together; reports the worst error and its lane's file."""
    torch.set_num_threads(1)
    try:
        s = _join(addr, 1, 2)
        q.put(("lane", s.link.lane.path if s.link.lane else None))
        s.begin_step(0)
        worst = 0.0
        for i in range(0, len(sizes), 2):
            a = s.allreduce_start(_value(1, i, sizes[i]))
            b = s.allreduce_start(_value(1, i + 1, sizes[i + 1]))
            for j, h in ((i, a), (i + 1, b)):
                worst = max(worst, (s.allreduce_wait(h) - _expected(2, j, sizes[j])).abs().max().item())
        q.put(("ok", worst))
        time.sleep(0.5)
        s.link.close()
    except Exception as e:
        q.put(("error", f"{type(e).__name__}: {e}"))


def test_a_local_worker_sums_on_its_lane_and_big_steps_in_frames_in_order(tmp_path):
    """Small steps ride the lane, steps over a slot (LANE SLOT_BYTES) the socket; in flight together
    in either order, each sum is its own. The lane's file is gone from /dev/shm once mapped."""
    from tpi_node.comm.lane import DOWN, SLOT_BYTES, UP

    big = SLOT_BYTES // (4 * H) + 1  # tokens: one over a slot
    sizes = [1, big, big, 1, 16, 16, 1, 1]
    server = StarServer(2, "127.0.0.1:0", unix_dir=str(tmp_path))
    try:
        q = mp.get_context("spawn").Queue()
        p = _start(_lane_spoke, (f"127.0.0.1:{server.port}", server.socket_path), q, sizes)
        server.wait_for_peers()
        kind, path = q.get(timeout=30)
        assert kind == "lane" and path and server.sessions.lane(1) is not None
        assert not os.path.exists(path)  # unlinked by the master: it lives in the two mappings
        hub = server.hub
        hub.begin_step(0)
        for i in range(0, len(sizes), 2):
            a = hub.allreduce_start(_value(0, i, sizes[i]))
            b = hub.allreduce_start(_value(0, i + 1, sizes[i + 1]))
            for j, h in ((i, a), (i + 1, b)):
                assert torch.allclose(hub.allreduce_wait(h), _expected(2, j, sizes[j]), atol=1e-5)
        assert q.get(timeout=30) == ("ok", pytest.approx(0.0, abs=1e-5))
        # the lane carried the 6 small steps both ways, the frames the 2 big ones
        assert server.sessions.lane(1).read[UP] == 6 and server.sessions.lane(1).written[DOWN] == 6
        p.join(timeout=10)
    finally:
        server.close()


def _aborted_spoke(addr, q):
    try:
        s = _join(addr, 1, 2)
        s.begin_step(0)
        try:
            s.allreduce(_value(1, 0, 1))
            q.put(("not aborted", ""))
        except StepAborted as e:
            q.put(("aborted", str(e)))
        s.begin_step(1)
        got = s.allreduce(_value(1, 1, 1))
        q.put(("ok", (got - _expected(2, 1, 1)).abs().max().item()))
        time.sleep(0.5)
        s.link.close()
    except Exception as e:
        q.put(("error", f"{type(e).__name__}: {e}"))


def test_an_abort_reaches_a_worker_waiting_on_its_lane_and_the_next_step_sums(tmp_path):
    """The worker waits for its sum on the lane; the master drops the step (a node was lost) and
    says so on the socket: the worker raises StepAborted, and the next step passes over the stale
    partial the aborted one left on the lane."""
    from tpi_node.comm.lane import UP

    server = StarServer(2, "127.0.0.1:0", unix_dir=str(tmp_path))
    try:
        q = mp.get_context("spawn").Queue()
        p = _start(_aborted_spoke, (f"127.0.0.1:{server.port}", server.socket_path), q)
        server.wait_for_peers()
        lane, deadline = server.sessions.lane(1), time.monotonic() + 30
        while lane.peek(UP, 0) != (0, 0):  # the step-0 partial is on the lane
            assert time.monotonic() < deadline
            time.sleep(0.01)
        server.shared.run(server.sessions.send_all(pb.MasterMsg(abort=pb.Abort(step_id=0, reason="node w9 was lost"))))
        assert q.get(timeout=30) == ("aborted", "node w9 was lost")
        hub = server.hub
        hub.begin_step(1)
        assert torch.allclose(hub.allreduce(_value(0, 1, 1)), _expected(2, 1, 1), atol=1e-5)
        status, worst = q.get(timeout=30)
        assert status == "ok" and worst < 1e-5
        p.join(timeout=10)
    finally:
        server.close()


def test_a_hello_naming_a_file_that_is_no_lane_is_refused(tmp_path):
    from tpi_node.comm.lane import SHM_DIR, Lane, LaneError

    bogus = SHM_DIR / f"tpi-node-lane-test-{os.getpid()}"
    bogus.write_bytes(b"\0" * 4096)
    try:
        with pytest.raises(LaneError, match="foreign header or size"):
            Lane.open(str(bogus))
        assert not bogus.exists()  # taken off /dev/shm even so
        with pytest.raises(LaneError, match="is not a lane file"):
            Lane.open(str(tmp_path / "x"))
        server = StarServer(2, "127.0.0.1:0", unix_dir=str(tmp_path))
        try:  # a raw socket: MasterLink would name its own lane
            with socket.socket(socket.AF_UNIX) as c:
                c.connect(server.socket_path)
                missing = "/dev/shm/tpi-node-lane-missing"
                hello = pb.WorkerMsg(hello=pb.Hello(node_id="odd", rank=1, lane=missing)).SerializeToString()
                c.sendall(struct.pack("<I", len(hello)) + hello)
                server.shared.run(asyncio.sleep(0.5))  # the server's loop reads it and answers
                c.settimeout(10)
                frame = b""
                while len(frame) < 4 or len(frame) < 4 + struct.unpack_from("<I", frame)[0]:
                    frame += c.recv(4096)
                reply = pb.MasterMsg.FromString(frame[4:])
            assert reply.WhichOneof("kind") == "shutdown" and reply.shutdown.code == pb.REFUSED
            assert f"node odd (rank 1): cannot open the lane {missing}" in reply.shutdown.reason
            assert server.sessions.missing() == [1]
        finally:
            server.close()
    finally:
        bogus.unlink(missing_ok=True)
