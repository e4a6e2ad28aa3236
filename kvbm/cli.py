"""The `kvbm` command."""

from __future__ import annotations

import argparse
import json
import sys

from discovery.errors import DiscoveryError
from kvbm.config import bind_native_transport, quiet_native_logs
from kvbm.config_text import add_flags, from_args, reference_table, to_toml
from kvbm.errors import KvbmError
from kvbm.logs import setup_logging
from transport.errors import TransportError


def main(argv: list[str] | None = None) -> int:
    quiet_native_logs()
    parser = argparse.ArgumentParser(prog="kvbm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="single-node demo on embedded defaults")
    add_flags(demo)
    demo.add_argument("--prompts", type=int, default=12)
    demo.add_argument("--blocks-per-prompt", type=int, default=16)
    demo.add_argument(
        "--engine",
        choices=("auto", "vllm", "synthetic"),
        default="auto",
        help="auto: vLLM when it is installed, synthetic engines otherwise",
    )

    node = sub.add_parser("node", help="run the node daemon (one per machine) until SIGTERM")
    add_flags(node)

    status = sub.add_parser("status", help="nodes, tiers and hit rates (etcd, or one node)")
    add_flags(status)
    status.add_argument("--json", action="store_true", help="print one JSON object")

    cfg = sub.add_parser("config", help="print the effective configuration")
    add_flags(cfg)
    cfg.add_argument("--reference", action="store_true", help="print the reference table")

    bench = sub.add_parser("bench", help="measured figures with their physical references")
    which = bench.add_subparsers(dest="bench", required=True)
    tiers = which.add_parser("tiers", help="G1 <-> G2 <-> G3 bandwidth and bookkeeping cost")
    tiers.add_argument("--json", action="store_true", help="print one JSON object")
    tiers.add_argument("--blocks", type=int, default=256, help="blocks per batch (1 MiB each)")
    tiers.add_argument("--reps", type=int, default=7)
    tiers.add_argument("--dir", default=None, help="directory for the disk files (default: TMPDIR)")
    tiers.add_argument(
        "--layout",
        default="LBHNC",
        choices=["LBHNC", "LBNHC", "LHBNC", "BLHNC", "BLNHC", "BHLNC", "MLA"],
        help="the engine cache's KV layout (vLLM's names; MLA: a latent cache)",
    )

    index = which.add_parser("index", help="the etcd index: publish rate, lookup, lag, cleanup")
    index.add_argument("--json", action="store_true", help="print one JSON object")
    index.add_argument("--nodes", type=int, default=0, help="N simulated nodes on a prompt trace")
    index.add_argument("--lease-ttl", type=int, default=3, help="lease TTL of the nodes (s)")
    index.add_argument(
        "--layout",
        choices=("mirror", "sharded"),
        default="mirror",
        help="with --nodes: every node mirrors the fleet (etcd), or the sharded index",
    )

    transport = which.add_parser("transport", help="pulls between two node processes over NIXL")
    transport.add_argument("--json", action="store_true", help="print one JSON object")
    transport.add_argument(
        "--arena-dir", default="/dev/shm", help="memory file system of both nodes' host arenas"
    )
    soak = which.add_parser("soak", help="three nodes under load and faults, every block checked")
    soak.add_argument("--json", action="store_true", help="print one JSON object")
    soak.add_argument("--minutes", type=float, default=5.0)
    soak.add_argument(
        "--faults", default="kill,freeze,etcd,corrupt", help="kinds to inject (comma list, or none)"
    )
    soak.add_argument("--fault-every", type=float, default=4.0, help="seconds between faults")
    soak.add_argument("--seed", type=int, default=1)
    engines = which.add_parser("engines", help="engine processes on one node: calls/s, latency")
    engines.add_argument("--json", action="store_true", help="print one JSON object")
    engines.add_argument("--engines", type=int, default=4, help="engine processes")
    engines.add_argument("--seconds", type=float, default=5.0, help="each phase's length")
    engines.add_argument(
        "--ready-timeout",
        type=float,
        default=120.0,
        help="seconds for every engine process to import and attach before the first phase",
    )
    e2e = which.add_parser("e2e", help="vLLM time to first token: recompute, hits local and remote")
    e2e.add_argument("--json", action="store_true", help="print one JSON object")
    e2e.add_argument("--prompts", type=int, default=6, help="prompts per figure (median)")
    e2e.add_argument(
        "--arena-dir", default="/dev/shm", help="memory file system of both nodes' host arenas"
    )
    e2e.add_argument(
        "--concurrency",
        type=int,
        default=0,
        help="instead: throughput with N requests at once, misses and a half-held mix",
    )
    e2e.add_argument(
        "--engine-copies",
        default="auto",
        choices=["auto", "sync", "async"],
        help="the connector's engine_copies (with --concurrency)",
    )
    chat = which.add_parser(
        "chat", help="multi-round QA over two vLLM servers on two nodes, with and without kvbm"
    )
    chat.add_argument("--json", action="store_true", help="print one JSON object")
    chat.add_argument("--users", type=int, default=5, help="users (odd: rounds change server)")
    chat.add_argument("--rounds", type=int, default=3, help="rounds of question and answer")
    chat.add_argument(
        "--qps", default="0.5,2", help="load levels: requests per second, comma-separated"
    )

    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from kvbm import demo as demo_mod

            return demo_mod.main(args)
        if args.command == "node":
            from kvbm.node import daemon

            cfg = from_args(args)
            setup_logging(cfg.log_level)
            bind_native_transport(cfg.listen_address[0])
            return daemon.run(cfg)
        if args.command == "status":
            from kvbm import status as status_mod

            cfg = from_args(args)
            result = status_mod.fleet(cfg) if cfg.etcd else status_mod.node(cfg)
            print(json.dumps(result) if args.json else status_mod.render(result))
            return 0
        if args.command == "config":
            print(reference_table() if args.reference else to_toml(from_args(args)), end="\n")
            return 0
        if args.command == "bench":
            setup_logging("warning")
            if args.bench == "tiers":
                from kvbm.bench import tiers as tiers_mod

                result = tiers_mod.run(args.blocks, args.reps, args.dir, args.layout)
            elif args.bench == "index":
                from kvbm.bench import index as index_mod

                result = index_mod.run(args.nodes, args.lease_ttl, args.layout)
            elif args.bench == "transport":
                from kvbm.bench import transport as transport_mod

                result = transport_mod.run(args.arena_dir)
            elif args.bench == "engines":
                from kvbm.bench import engines as engines_mod

                result = engines_mod.run(args.engines, args.seconds, args.ready_timeout)
            elif args.bench == "chat":
                from kvbm.bench import chat as chat_mod

                levels = tuple(float(q) for q in args.qps.split(",") if q)
                result = chat_mod.run(args.users, args.rounds, levels)
            elif args.bench == "soak":
                from kvbm.bench import soak as soak_mod

                kinds = tuple(k for k in args.faults.split(",") if k and k != "none")
                result = soak_mod.run(args.minutes, kinds, args.fault_every, args.seed)
            else:
                from kvbm.bench import e2e as e2e_mod

                if args.concurrency:
                    result = e2e_mod.run_concurrency(
                        args.concurrency, engine_copies=args.engine_copies
                    )
                else:
                    result = e2e_mod.run(args.prompts, arena_dir=args.arena_dir)
            if args.json:
                print(json.dumps(result))
            else:
                for k, v in result.items():
                    print(f"{k:28} {v}")
            return 1 if "error" in result else 0
    except (ValueError, KvbmError, TransportError, DiscoveryError, OSError) as e:
        print(f"kvbm: {e}", file=sys.stderr)
        return 2
    parser.error("unknown command")
    return 2


if __name__ == "__main__":
    sys.exit(main())
