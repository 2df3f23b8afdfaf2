"""mDNS discovery with real zeroconf, advertisers and browsers in separate processes, inside a
private network namespace (loopback with multicast) so nothing reaches a real network."""

from __future__ import annotations

import json

from tests.netns_util import in_private_net

# Runs inside the namespace: advertisers as child processes, then the lookups; prints JSON.
SCENARIO = r'''
import json, subprocess, sys, time
ADV = """
import sys
from tpi_node.cluster import discovery as d
ads = {}
for line in sys.stdin:            # "master CLUSTER ID PORT" / "worker CLUSTER ID 0" / "close ID"
    role, cluster, nid, port = (line.split() + ["", "", ""])[:4]
    if role == "close":
        ads.pop(cluster).close()
    elif role == "master":
        ads[nid] = d.advertise_master(cluster, nid, "0.1.0", int(port), int(port) + 1)
    else:
        ads[nid] = d.advertise_worker(cluster, nid, "0.1.0", 8 << 30, 4)
    print("ok", flush=True)
for a in ads.values():
    a.close()
"""
from tpi_node.cluster import discovery as d

adv = subprocess.Popen([sys.executable, "-c", ADV], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
def say(line):
    adv.stdin.write(line + "\n"); adv.stdin.flush()
    assert adv.stdout.readline().strip() == "ok"

def err(cluster, timeout):
    try:
        m = d.find_master(cluster, timeout=timeout)
        return "found " + m.node_id
    except d.DiscoveryError as e:
        return str(e)

out = {"nothing": err("default", 1.0)}
say("master lab m-lab 50061"); say("worker default w-one 0")
out["other_cluster_only"] = err("default", 1.5)
say("master default m-default 50051")
t = time.monotonic()
m = d.find_master("default", timeout=5.0)
out["found"] = {"id": m.node_id, "port": m.port, "http": m.http_port, "address": m.address,
                "cluster": m.cluster, "seconds": time.monotonic() - t}
out["lab"] = d.find_master("lab", timeout=5.0).node_id
with d.WorkerBrowser("default") as wb:
    deadline = time.monotonic() + 5
    workers = []
    while time.monotonic() < deadline and not workers:
        workers = wb.workers(); time.sleep(0.1)
    out["workers"] = [(w.node_id, w.props.get("memory"), w.props.get("cores")) for w in workers]
say("master default m-second 50071")
out["two_masters"] = err("default", 2.0)
say("close m-second"); say("close m-lab")
out["after_goodbye"] = d.find_master("default", timeout=3.0).node_id     # goodbye packets drop the others
adv.stdin.close(); adv.wait(timeout=10)
print(json.dumps(out))
'''


def test_discovery_scenario():
    r = in_private_net(SCENARIO, timeout=90)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])

    assert "no tpi-node master answered" in out["nothing"] and "5353" in out["nothing"]
    # a master of another cluster is not picked, and the error says what was found
    assert "no master of cluster 'default'" in out["other_cluster_only"]
    assert "m-lab" in out["other_cluster_only"] and "'lab'" in out["other_cluster_only"]

    f = out["found"]
    assert (f["id"], f["port"], f["http"], f["cluster"]) == ("m-default", 50051, 50052, "default")
    assert f["address"] == "127.0.0.1" and f["seconds"] < 3.0
    assert out["lab"] == "m-lab"
    assert out["workers"] == [["w-one", str(8 << 30), "4"]]
    assert "found 2 masters of cluster 'default'" in out["two_masters"]
    assert "m-default" in out["two_masters"] and "m-second" in out["two_masters"]
    assert out["after_goodbye"] == "m-default"
