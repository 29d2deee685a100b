"""`python -m exo_bridge.testbed up|down|status`: hold an emulated cluster, remove leftovers by
prefix, or list them."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict

from exo_bridge.testbed.bed import Testbed
from exo_bridge.testbed.spec import (DEFAULT_PREFIX, TestbedSpec, _parse_lat, _parse_rate,
                                     parse_link, parse_nodes)
from exo_bridge.testbed.system import status, teardown
from profiler.errors import guard


@guard
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m exo_bridge.testbed",
                                 description="emulated heterogeneous cluster (root)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up", help="build the testbed and hold it until Ctrl-C")
    u.add_argument("--nodes", required=True, help="NAME:CPU,... e.g. fast:1,mid:0.5,slow:0.25")
    u.add_argument("--link", action="append", default=[], help="A-B:LATENCY:RATE (repeatable)")
    u.add_argument("--default-link", default="1ms:1000mbit")
    u.add_argument("--prefix", default=DEFAULT_PREFIX)
    for name in ("down", "status"):
        p = sub.add_parser(name)
        p.add_argument("--prefix", default=DEFAULT_PREFIX)
    args = ap.parse_args(argv)
    if args.cmd == "down":
        removed = teardown(args.prefix)
        print("\n".join(removed) if removed else f"nothing with prefix {args.prefix!r} to remove")
        return 0
    if args.cmd == "status":
        print(json.dumps(status(args.prefix), indent=1))
        return 0
    lat, rate = args.default_link.split(":")
    spec = TestbedSpec(parse_nodes(args.nodes), [parse_link(s) for s in args.link],
                       _parse_lat(lat), _parse_rate(rate), prefix=args.prefix)
    with Testbed(spec) as tb:
        print(json.dumps({"nodes": {n.id: {"ip": tb.ip(n.id), "netns": tb.ns(n.id),
                                           "cpu": n.cpu} for n in spec.nodes},
                          "links": [asdict(lk) for lk in spec.links]}, indent=1))
        print("testbed up; Ctrl-C removes it", flush=True)
        while True:
            time.sleep(3600)
    return 0
