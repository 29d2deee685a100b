"""`exo-bridge`: run a measured split on exo (legacy and current) and on MLX.

    exo-bridge place --plan PLAN --api http://HOST:52415 --model MODEL_ID [--dry-run]
    exo-bridge compare PLAN
    exo-bridge exo-legacy --plan PLAN [--node-map FILE] -- [exo's own arguments]
    exo-bridge strategy-check --plan PLAN --node NAME:MEMORY_MB ... [--layers N]
    exo-bridge run ...          (the MLX pipeline runner: exo_bridge.runner.run)

Bad input is one line on stderr and exit code 2 (profiler.errors.guard).
"""

from __future__ import annotations

import argparse
import sys

from profiler.errors import guard


def _run_runner(rest: list[str]) -> int:
    from exo_bridge.runner import run as runner  # imported lazily: heavy (MLX)

    rc = runner.main(rest)
    return 0 if rc is None else int(rc)


def build_parser() -> argparse.ArgumentParser:
    from exo_bridge import compare, launch_legacy, place

    ap = argparse.ArgumentParser(prog="exo-bridge", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")
    p = sub.add_parser("place", help="place a plan on current exo through its HTTP API")
    place.add_arguments(p)
    p.set_defaults(func=place.run)
    c = sub.add_parser("compare", help="exo legacy's, current exo's and the measured split "
                                       "side by side, with predicted times")
    compare.add_arguments(c)
    c.set_defaults(func=compare.run)
    x = sub.add_parser("exo-legacy", help="start legacy exo's node with the measured strategy")
    launch_legacy.add_arguments(x)
    x.set_defaults(func=launch_legacy.run)
    s = sub.add_parser("strategy-check", help="what the legacy strategy answers for a topology")
    launch_legacy.add_check_arguments(s)
    s.set_defaults(func=launch_legacy.run_check)
    sub.add_parser("run", help="run a plan on MLX's distributed runtime (see `exo-bridge run "
                               "--help`)", add_help=False)
    return ap


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "run":
        return _run_runner(argv[1:])
    ap = build_parser()
    args, extra = ap.parse_known_args(argv)
    if args.cmd is None:
        ap.print_help()
        return 2
    if extra and args.cmd != "exo-legacy":
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.cmd == "exo-legacy":
        args.exo_args = list(getattr(args, "exo_args", []) or []) + extra
    return args.func(args)


main = guard(_main)


if __name__ == "__main__":
    sys.exit(main())
