"""The dashboard page in headless Chromium: against a real uvicorn server with a given state (it
shows every node, follows a lost node), and against a real 3-node cluster (every node of
/health shows; the screenshot in docs/dashboard.png comes from it, with TPI_UPDATE_DOCS=1)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM, DRIVER = (
    shutil.which("chromium") or "/usr/bin/chromium",
    shutil.which("chromedriver") or "/usr/bin/chromedriver",
)


def _state(lost: bool, tokens: int) -> dict:
    nodes = [
        {
            "id": "desk-3f2a91c0",
            "role": "master",
            "address": "192.168.1.10",
            "kv": [0, 2],
            "ffn": [0, 768],
            "memory_budget": None,
            "window": None,
            "state": "ready",
            "last_heartbeat_s": 0.0,
            "tokens_per_s": 9.5,
        },
        {
            "id": "laptop-7be01d44",
            "role": "worker",
            "address": "192.168.1.23",
            "kv": [2, 3],
            "ffn": [768, 1152],
            "memory_budget": 2 << 30,
            "window": 8,
            "state": "ready",
            "last_heartbeat_s": 0.4,
            "tokens_per_s": 9.5,
        },
        {
            "id": "jetson-0c55e2b9",
            "role": "worker",
            "address": "192.168.1.31",
            "kv": [3, 4],
            "ffn": [1152, 1536],
            "memory_budget": 1 << 30,
            "window": 4,
            "state": "lost" if lost else "ready",
            "last_heartbeat_s": 4.2 if lost else 0.3,
            "tokens_per_s": None if lost else 9.5,
        },
    ]
    return {
        "cluster": "default",
        "model": "SmolLM2-360M-Instruct",
        "version": "0.1.0",
        "ready": not lost,
        "plan": {
            "digest": "9c1e0f7a2b3d4e5f",
            "world_size": 3,
            "kv_heads": 4,
            "ffn": 1536,
            "layers": 32,
            "wire_dtype": "fp32",
        },
        "throughput": {"completion_tokens": tokens, "running": 2, "waiting": 0},
        "nodes": nodes,
    }


@pytest.fixture()
def server():
    import uvicorn
    from fastapi import FastAPI

    from tpi_node.server.dashboard import dashboard_router

    box = {"lost": False, "t0": time.time()}
    app = FastAPI()
    app.include_router(dashboard_router(lambda: _state(box["lost"], int((time.time() - box["t0"]) * 12))))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    while not srv.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/", box
    srv.should_exit = True
    th.join(5)


def _install_chromium() -> None:
    """As root with apt (a fresh CI machine): install Debian's chromium and its driver, once."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=300)
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"], env=env, capture_output=True, timeout=600
        )
    except (OSError, subprocess.TimeoutExpired):
        pass


def _browser(profile: str):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
        _install_chromium()
    if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
        pytest.skip("chromium / chromedriver not installed (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1400,800",
    ):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(DRIVER), options=opts)


def test_dashboard_in_headless_chromium(server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, box = server
    profile = tempfile.mkdtemp(prefix="tpi-chromium-")
    drv = _browser(profile)
    try:
        drv.get(url)
        wait = WebDriverWait(drv, 15)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#nodes tr[data-node]")) == 3)
        rows = {
            r.get_attribute("data-node"): r.text for r in drv.find_elements(By.CSS_SELECTOR, "#nodes tr[data-node]")
        }
        assert set(rows) == {"desk-3f2a91c0", "laptop-7be01d44", "jetson-0c55e2b9"}
        assert "master" in rows["desk-3f2a91c0"] and "192.168.1.23" in rows["laptop-7be01d44"]
        assert "8 layers" in rows["laptop-7be01d44"] and "2.0 GiB" in rows["laptop-7be01d44"]
        assert "0-1 (2)" in rows["desk-3f2a91c0"]  # KV heads 0..1
        assert drv.find_element(By.ID, "ready").text == "ready"
        assert "9c1e0f7a2b3d4e5f" in drv.find_element(By.ID, "plan").text
        # throughput is estimated from the token counter between polls
        wait.until(lambda d: d.find_element(By.ID, "tps").text not in ("-", "0.0"))
        assert 5 < float(drv.find_element(By.ID, "tps").text) < 20
        # the page follows the master: a lost node turns red, the cluster not ready
        box["lost"] = True
        wait.until(lambda d: d.find_element(By.ID, "ready").text == "not ready")
        lost = drv.find_element(By.CSS_SELECTOR, 'tr[data-node="jetson-0c55e2b9"] .pill')
        assert lost.text == "lost" and "bad" in lost.get_attribute("class")
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_dashboard_of_a_real_cluster(tmp_path, tiny_model_dir):
    import openai
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.cluster_procs import Node, free_port, wait_health
    from tpi_node.commands.status import fetch_state, format_table

    model = tiny_model_dir("tiny-llama3")
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
            "3",
            "--memory-budget",
            "2GiB",
        ],
    )
    workers = [
        Node(f"worker{i}", tmp_path, ["join", "--master", f"127.0.0.1:{grpc_port}", "--memory-budget", budget])
        for i, budget in ((1, "1GiB"), (2, "512MiB"))
    ]
    url = f"http://127.0.0.1:{http}"
    profile = tempfile.mkdtemp(prefix="tpi-chromium-")
    drv = None
    try:
        ids = {n["id"] for n in wait_health(url, 3, 60, [master, *workers])["nodes"]}
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        stop = threading.Event()

        def load() -> None:  # live throughput while the page is open
            while not stop.is_set():
                client.completions.create(
                    model=model.name,
                    prompt="Once upon a time",
                    max_tokens=64,
                    temperature=0,
                    extra_body={"ignore_eos": True},
                )

        th = threading.Thread(target=load, daemon=True)
        th.start()
        drv = _browser(profile)
        drv.get(url + "/")
        wait = WebDriverWait(drv, 20)
        wait.until(
            lambda d: (
                {r.get_attribute("data-node") for r in d.find_elements(By.CSS_SELECTOR, "#nodes tr[data-node]")} == ids
            )
        )
        wait.until(lambda d: d.find_element(By.ID, "tps").text not in ("-", "0.0"))
        rows = [r.text for r in drv.find_elements(By.CSS_SELECTOR, "#nodes tr[data-node]")]
        assert sum("master" in r for r in rows) == 1 and all("ready" in r for r in rows)
        assert any("512.0 MiB" in r for r in rows)
        time.sleep(2)  # a few seconds of the throughput chart
        # TPI_UPDATE_DOCS=1 refreshes the screenshot in docs/; otherwise the tree stays clean
        docs = REPO / "docs" if os.environ.get("TPI_UPDATE_DOCS") == "1" else Path(profile)
        drv.save_screenshot(str(docs / "dashboard.png"))
        assert (docs / "dashboard.png").stat().st_size > 10_000
        stop.set()
        th.join(30)
        # `tpi-node status` prints the same nodes from the same JSON
        table = format_table(fetch_state(url))
        assert all(i in table for i in ids) and "ready" in table.splitlines()[0]
    finally:
        if drv is not None:
            drv.quit()
        shutil.rmtree(profile, ignore_errors=True)
        for n in [master, *workers]:
            n.stop()
