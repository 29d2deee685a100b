"""`exo-bridge`: run a measured split on exo (legacy and current) and on MLX.

    exo-bridge place --plan PLAN --api http://HOST:52415 --model MODEL_ID [--dry-run]
    exo-bridge compare PLAN
    exo-bridge exo-legacy --plan PLAN [--node-map FILE] -- [exo's own arguments]
    exo-bridge exo-legacy install --python EXO_PYTHON   (the strategy into exo's own env)
    exo-bridge strategy-check --plan PLAN --node NAME:MEMORY_MB ... [--layers N]
    exo-bridge run ...          (the MLX pipeline runner: exo_bridge.runner.run)

Bad input is one line on stderr and exit code 2 (profiler.errors.guard).
"""

from __future__ import annotations

import argparse
import sys

from profiler import options as o
from profiler.errors import UserError, guard


def _run_runner(rest: list[str]) -> int:
    from exo_bridge.runner import run as runner  # imported lazily: heavy (MLX)

    rc = runner.main(rest)
    return 0 if rc is None else int(rc)


def build_parser() -> argparse.ArgumentParser:
    from exo_bridge import compare
    from exo_bridge.exo_current import place
    from exo_bridge.exo_legacy import cli as legacy_cli

    ap = o.OneLineParser(prog="exo-bridge", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")
    p = sub.add_parser("place", help="place a plan on current exo through its HTTP API")
    place.add_arguments(p)
    p.set_defaults(func=place.run)
    c = sub.add_parser("compare", help="exo legacy's, current exo's and the measured split "
                                       "side by side, with predicted times")
    compare.add_arguments(c)
    c.set_defaults(func=compare.run)
    x = sub.add_parser("exo-legacy", help="start legacy exo's node with the measured strategy")
    legacy_cli.add_arguments(x)
    x.set_defaults(func=legacy_cli.run)
    s = sub.add_parser("strategy-check", help="what the legacy strategy answers for a topology")
    legacy_cli.add_check_arguments(s)
    s.set_defaults(func=legacy_cli.run_check)
    sub.add_parser("run", help="run a plan on MLX's distributed runtime (see `exo-bridge run "
                               "--help`)", add_help=False)
    return ap


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "run":
        return _run_runner(argv[1:])
    if argv[:2] == ["exo-legacy", "install"]:
        from exo_bridge.exo_legacy import install

        return install._main(argv[2:])
    ap = build_parser()
    args, extra = ap.parse_known_args(argv)
    if args.cmd is None:
        raise UserError("exo-bridge: give a command: place, compare, exo-legacy, "
                        "strategy-check or run (see exo-bridge --help)")
    if extra and args.cmd != "exo-legacy":
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.cmd == "exo-legacy":
        args.exo_args = list(getattr(args, "exo_args", []) or []) + extra
    return args.func(args)


main = guard(_main)


if __name__ == "__main__":
    sys.exit(main())
