"""`tpi-node status`, `tpi-node token`, `tpi-node certs` through their argparse entry points,
against a real HTTP server."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from tests.test_dashboard import _state
from tpi_node.cli import parse
from tpi_node.cluster import tls
from tpi_node.errors import UserError


def _run(argv: list[str], capsys) -> str:
    cmd, settings, _ = parse(argv)  # the CLI's own parser and settings
    assert cmd.run(settings) == 0
    return capsys.readouterr().out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_certs_command_makes_a_verifiable_cluster(tmp_path, capsys):
    out = _run(
        ["certs", "--out", str(tmp_path), "--worker", "laptop", "--worker", "jetson", "--host", "10.0.0.5"], capsys
    )
    ca = (tmp_path / "ca.crt").read_bytes()
    for name in ("master", "laptop", "jetson"):
        assert str(tmp_path / f"{name}.crt") in out
        tls.verify_chain(ca, (tmp_path / f"{name}.crt").read_bytes())
    # a second run adds a node with the same CA
    _run(["certs", "--out", str(tmp_path), "--worker", "desk"], capsys)
    assert (tmp_path / "ca.crt").read_bytes() == ca
    tls.verify_chain(ca, (tmp_path / "desk.crt").read_bytes())
    with pytest.raises(UserError, match="bad worker certificate name"):
        _run(["certs", "--out", str(tmp_path), "--worker", "../x"], capsys)


def test_status_prints_every_node(capsys):
    import uvicorn
    from fastapi import FastAPI

    from tpi_node.server.dashboard import dashboard_router

    app = FastAPI()
    app.include_router(dashboard_router(lambda: _state(lost=True, tokens=42)))
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    while not srv.started:
        time.sleep(0.05)
    try:
        out = _run(["status", "--master", f"127.0.0.1:{port}"], capsys)
    finally:
        srv.should_exit = True
        th.join(5)
    lines = out.strip().splitlines()
    assert "NOT READY" in lines[0] and "SmolLM2-360M-Instruct" in lines[0]
    assert lines[1].split()[:3] == ["NODE", "ROLE", "ADDRESS"]
    rows = {line.split()[0]: line for line in lines[2:]}
    assert set(rows) == {"desk-3f2a91c0", "laptop-7be01d44", "jetson-0c55e2b9"}
    assert "lost" in rows["jetson-0c55e2b9"] and "4.2s ago" in rows["jetson-0c55e2b9"]
    assert "8 layers" in rows["laptop-7be01d44"] and "resident" in rows["desk-3f2a91c0"]


def test_status_unreachable_is_one_line(capsys):
    with pytest.raises(UserError, match="cannot read the cluster state from http://127.0.0.1:"):
        _run(["status", "--master", f"127.0.0.1:{_free_port()}"], capsys)
