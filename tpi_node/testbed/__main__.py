"""scripts/testbed: an emulated home network of small machines on one Linux box (root).

scripts/testbed up [--preset tpi-paper] [--nodes 4] [--rate 300mbit] [--latency-ms 1]
                   [--memory 2GiB] [--cpus 1] [--hold]
scripts/testbed exec n0 tpi-node serve --model M --host 0.0.0.0 --min-nodes 3
scripts/testbed shape --latency-ms 5 [--rate 100mbit]     # change a running testbed's links
scripts/testbed status
scripts/testbed down
scripts/testbed run [up flags] -- CMD ...                # up, run CMD on the host, down
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

from tpi_node.errors import UserError
from tpi_node.testbed.netns import Interrupted, Testbed
from tpi_node.testbed.presets import make_spec, preset_names


def _add_shape_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rate", default=None, help="link rate each way, e.g. 300mbit ('none': unshaped)")
    p.add_argument("--latency-ms", type=float, default=None, help="one-way node-to-node latency")


def _add_up_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tpi-paper", help=f"one of {', '.join(preset_names())} (default tpi-paper)")
    p.add_argument("--nodes", type=int, default=None)
    _add_shape_flags(p)
    p.add_argument("--memory", default=None, help="memory limit per node, e.g. 2GiB")
    p.add_argument("--cpus", type=float, default=None, help="CPU quota per node, e.g. 1.5")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts/testbed",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--name", default=os.environ.get("TPI_TESTBED", "tpitb"), help="testbed name (tpitb)")
    p.add_argument("--subnet", default=os.environ.get("TPI_TESTBED_SUBNET", "10.231.7.0/24"))
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    up = sub.add_parser("up", help="build the testbed (replaces one of the same name)")
    _add_up_flags(up)
    up.add_argument(
        "--relay",
        action="store_true",
        help="a delay relay even at 0 ms, so `shape --latency-ms` also reaches open connections",
    )
    up.add_argument("--hold", action="store_true", help="stay in the foreground; Ctrl-C takes it down")
    r = sub.add_parser("run", help="up, run a command on the host, down (also when interrupted)")
    _add_up_flags(r)
    r.add_argument("argv", nargs=argparse.REMAINDER)
    sub.add_parser("down", help="remove namespaces, links, relays and cgroups")
    sub.add_parser("status", help="nodes, addresses, relays, memory, processes")
    s = sub.add_parser("shape", help="change the link rate and/or latency of the running testbed")
    _add_shape_flags(s)
    e = sub.add_parser("exec", help="run a command as a node (its namespace, hostname and cgroups)")
    e.add_argument("node", help="n0, n1, ... (n0 is the usual master)")
    e.add_argument("argv", nargs=argparse.REMAINDER)
    return p


def _spec(args):
    return make_spec(
        args.preset, nodes=args.nodes, rate=args.rate, latency_ms=args.latency_ms, memory=args.memory, cpus=args.cpus
    )


def _print_nodes(tb: Testbed, nodes) -> None:
    print(f"testbed '{tb.name}' up: {tb.spec().describe()}")
    for n in nodes:
        print(f"  {n.name:<10} {n.ip}")
    print(f"  host bridge {tb.bridge} {tb.bridge_ip}; run a node: scripts/testbed exec n0 CMD")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        tb = Testbed(args.name, args.subnet)
        if args.cmd == "up":
            nodes = tb.up(_spec(args), relay=True if args.relay else None)
            _print_nodes(tb, nodes)
            if args.hold:
                signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
                try:
                    print("holding; Ctrl-C takes the testbed down", flush=True)
                    signal.pause()
                finally:
                    tb.down()
        elif args.cmd == "run":
            cmd = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
            if not cmd:
                raise UserError("run needs a command after --")
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
            try:
                _print_nodes(tb, tb.up(_spec(args)))
                return subprocess.call(cmd)
            finally:
                tb.down()
        elif args.cmd == "down":
            removed = tb.down()
            print(f"testbed '{tb.name}' down" + (f": removed {len(removed)} objects" if removed else " (nothing left)"))
        elif args.cmd == "status":
            print(tb.status())
        elif args.cmd == "shape":
            spec = tb.set_link(
                rate="keep" if args.rate is None else make_spec(rate=args.rate).rate_bps, latency_ms=args.latency_ms
            )
            print(f"testbed '{tb.name}': {spec.describe()}")
        elif args.cmd == "exec":
            cmd = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
            if not cmd:
                raise UserError("exec needs a command")
            env = {**os.environ, **tb.env(args.node)}
            return subprocess.call(tb.command(args.node, cmd), env=env)
    except UserError as e:
        print(f"testbed: error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Interrupted):
        print("testbed: interrupted; nothing of it is left", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
