"""The link relay: netem's "delay D rate R" per chunk, in user space (kernels without sch_netem
exist). One listening port per directed connection; runs in the hub namespace.

    python -m exo_bridge.testbed.relay --routes B64   (started by Testbed; prints "ready")
"""

from __future__ import annotations

import argparse
import base64
import json
import queue
import socket
import sys
import threading
import time
from typing import Any

def _pipe(src: socket.socket, dst: socket.socket, latency_s: float, rate_Bps: float) -> None:
    """Copy src -> dst with netem-like 'delay latency rate rate' per chunk (two threads)."""
    q: queue.Queue = queue.Queue()

    def reader():
        free_at = 0.0
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                now = time.monotonic()
                start = max(now, free_at)
                free_at = start + (len(data) / rate_Bps if rate_Bps > 0 else 0.0)
                q.put((free_at + latency_s, data))
        except OSError:
            pass
        q.put(None)

    def writer():
        try:
            while True:
                item = q.get()
                if item is None:
                    break
                due, data = item
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                dst.sendall(data)
        except OSError:
            pass
        for s in (dst, src):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    threading.Thread(target=reader, daemon=True).start()
    threading.Thread(target=writer, daemon=True).start()


def _serve_route(lsock: socket.socket, route: dict[str, Any]) -> None:
    tgt = tuple(route["target"])
    while True:
        try:
            conn, _ = lsock.accept()
        except OSError:
            return
        deadline = time.monotonic() + 120
        while True:  # the target may not listen yet (ranks start together): retry
            try:
                out = socket.create_connection(tgt, timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    conn.close()
                    out = None
                    break
                time.sleep(0.05)
        if out is None:
            continue
        out.settimeout(None)
        for s in (conn, out):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _pipe(conn, out, route["fwd"][0], route["fwd"][1])
        _pipe(out, conn, route["back"][0], route["back"][1])


def relay_main(routes: list[dict[str, Any]]) -> None:
    """Run the relay: each route {listen: [ip, port], target: [ip, port], fwd: [lat_s, Bps],
    back: [lat_s, Bps]}. Prints 'ready' once every port listens; runs until killed."""
    socks = []
    for r in routes:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(tuple(r["listen"]))
        s.listen(8)
        socks.append(s)
    for s, r in zip(socks, routes):
        threading.Thread(target=_serve_route, args=(s, r), daemon=True).start()
    print("ready", flush=True)
    while True:
        time.sleep(3600)



def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m exo_bridge.testbed.relay")
    ap.add_argument("--routes", required=True, help="base64 JSON list of routes")
    args = ap.parse_args(argv)
    relay_main(json.loads(base64.b64decode(args.routes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
