"""`exo-bridge exo-legacy install --python EXO_PYTHON`: the strategy into legacy exo's environment.

Legacy exo pins its libraries (exo's setup.py at e4238f9: mlx==0.22.0 and mlx-lm==0.21.1 on
Apple silicon, transformers==4.46.3, numpy==2.0.0, ...). This toolkit needs far newer ones
(mlx>=0.29, mlx-lm>=0.28, scipy, ...), so `pip install` of the toolkit into exo's environment
would upgrade exo's pins and break exo's MLX engine. Instead this command:

1. records every distribution and version in exo's environment and what `pip check` says;
2. builds a stand-alone wheel, `exo-measured-split-strategy`, that DECLARES NO DEPENDENCIES and
   holds only standard-library code: the strategy (strategy.py), the launcher (launch.py) and
   legacy exo's rules (graphsplit/exo_rules.py), plus the toolkit's Python for re-planning;
3. installs it with `pip install --no-deps --no-index` (nothing can be fetched or upgraded);
4. records the environment again and refuses, uninstalling the wheel, unless every other
   distribution has the same version and `pip check` reports no new problem;
5. imports the strategy in exo's Python and checks it pulled in none of the toolkit's
   dependencies (and that it subclasses exo's PartitioningStrategy when exo is there).

`--wheel-out DIR` only writes the wheel (to copy to other machines and install there with
`pip install --no-deps FILE`); `--uninstall` removes it with the same before/after check.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib
import json
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from profiler.errors import UserError, guard

DIST = "exo-measured-split-strategy"
PACKAGE = "exo_measured_split"
TOOLKIT_ROOT = Path(__file__).resolve().parents[2]  # the directory holding exo_bridge/
# the modules the stand-alone distribution ships: name in the package -> module in the toolkit
SOURCES = {"strategy.py": "exo_bridge.exo_legacy.strategy",
           "launch.py": "exo_bridge.exo_legacy.launch",
           "_exo_rules.py": "graphsplit.exo_rules"}
INIT = '''"""The measured split for legacy exo, stand-alone (standard library only).

Installed by `exo-bridge exo-legacy install`; the one-line hook in exo/main.py:
    from exo_measured_split import strategy_from_env as RingMemoryWeightedPartitioningStrategy
or start exo with: python -m exo_measured_split --plan PLAN -- <exo's arguments>
"""

from .strategy import (EXO_INSTALLED, MeasuredPartitioningStrategy, StrategyError,  # noqa: F401
                       stages_to_partitions, strategy_from_env)
'''
MAIN = "from .launch import main\n\nraise SystemExit(main())\n"
# what must NOT be imported in exo's process by importing the strategy
FOREIGN = ("graphsplit", "profiler", "exo_bridge", "scipy", "networkx", "matplotlib")

PROBE = r"""
import importlib.metadata as md, json, subprocess, sys
dists = {}
for d in md.distributions():
    name = (d.metadata["Name"] or "").lower().replace("_", "-")
    if name:
        dists[name] = d.version
pip = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
print(json.dumps({"python": list(sys.version_info[:3]), "prefix": sys.prefix,
                  "dists": dists, "pip_rc": pip.returncode,
                  "pip_check": sorted(l for l in pip.stdout.splitlines() if l.strip()
                                      and not l.startswith("No broken"))}))
"""

VERIFY = r"""
import json, sys
before = set(sys.modules)
import exo_measured_split as m
from exo_measured_split.strategy import PartitioningStrategy, MeasuredPartitioningStrategy
new = sorted(k.split(".")[0] for k in set(sys.modules) - before)
print(json.dumps({"file": m.__file__, "exo_installed": m.EXO_INSTALLED,
                  "subclass_of_exo": issubclass(MeasuredPartitioningStrategy, PartitioningStrategy)
                  and PartitioningStrategy.__module__.startswith("exo."),
                  "imported": sorted(set(new))}))
"""


@dataclass
class EnvState:
    """One look at exo's environment: Python, distributions and versions, `pip check` lines."""

    python: list
    prefix: str
    dists: dict
    pip_check: list


def target_env() -> dict:
    """The environment for exo's Python: ours without the toolkit's checkout on PYTHONPATH (a
    development checkout must not make the toolkit importable over there)."""
    import os

    env = dict(os.environ)
    keep = [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
            if p and Path(p).resolve() != TOOLKIT_ROOT]
    if keep:
        env["PYTHONPATH"] = os.pathsep.join(keep)
    else:
        env.pop("PYTHONPATH", None)
    return env


def _run(python: str, args: list[str], what: str,
         timeout: int = 300) -> subprocess.CompletedProcess:
    """Run exo's Python, from a neutral directory (not the checkout: `-c` puts cwd on sys.path)."""
    try:
        return subprocess.run([python, *args], capture_output=True, text=True, timeout=timeout,
                              env=target_env(), cwd=tempfile.gettempdir())
    except OSError as e:
        raise UserError(f"--python {python}: cannot run it ({e.strerror or e}); give the Python "
                        "of legacy exo's environment, e.g. ~/exo/.venv/bin/python") from None
    except subprocess.TimeoutExpired:
        raise UserError(f"--python {python}: {what} did not finish in {timeout} s") from None


def probe(python: str) -> EnvState:
    """Distributions, versions and `pip check` of the environment of `python`."""
    cp = _run(python, ["-c", PROBE], "listing its packages")
    try:
        d = json.loads(cp.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        err = (cp.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"--python {python}: cannot list its packages ({err}); it needs "
                        "Python >= 3.8 with pip") from None
    if "pip" not in d["dists"]:
        raise UserError(f"--python {python}: its environment has no pip; install pip there "
                        f"(`{python} -m ensurepip`)")
    return EnvState(d["python"], d["prefix"], d["dists"], d["pip_check"])


def changes(before: EnvState, after: EnvState) -> list[str]:
    """Every difference in exo's environment other than our own distribution."""
    out = []
    names = (set(before.dists) | set(after.dists)) - {DIST}
    for n in sorted(names):
        a, b = before.dists.get(n), after.dists.get(n)
        if a != b:
            out.append(f"{n} {a or '(absent)'} -> {b or '(absent)'}")
    for line in sorted(set(after.pip_check) - set(before.pip_check)):
        out.append(f"pip check: {line}")
    return out


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def toolkit_version() -> str:
    try:
        from importlib.metadata import version

        return version("mlx-measured-split")
    except Exception:
        return "0.1.0"


def build_wheel(out_dir: Path, installed: dict | None) -> Path:
    """The stand-alone wheel (py3-none-any, no dependencies) in `out_dir`."""
    ver = toolkit_version()
    files: dict[str, bytes] = {f"{PACKAGE}/__init__.py": INIT.encode(),
                               f"{PACKAGE}/__main__.py": MAIN.encode()}
    for name, module in SOURCES.items():
        files[f"{PACKAGE}/{name}"] = Path(importlib.import_module(module).__file__).read_bytes()
    if installed is not None:
        files[f"{PACKAGE}/_installed.json"] = json.dumps(installed, indent=1).encode()
    stem = f"{DIST.replace('-', '_')}-{ver}"  # the wheel's and dist-info's name (PEP 427)
    info = f"{stem}.dist-info"
    files[f"{info}/METADATA"] = (
        f"Metadata-Version: 2.1\nName: {DIST}\nVersion: {ver}\n"
        "Summary: The measured split as a legacy exo PartitioningStrategy (standard library "
        "only, no dependencies)\nRequires-Python: >=3.8\n").encode()
    files[f"{info}/WHEEL"] = ("Wheel-Version: 1.0\nGenerator: exo-bridge\nRoot-Is-Purelib: "
                              "true\nTag: py3-none-any\n").encode()
    record = [_record_line(n, d) for n, d in files.items()] + [f"{info}/RECORD,,"]
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    path = Path(out_dir) / f"{stem}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name in sorted(files):
            info_ = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info_.external_attr = 0o644 << 16
            z.writestr(info_, files[name])
    return path


def _pip(python: str, args: list[str], what: str) -> None:
    cp = _run(python, ["-m", "pip", *args], what)
    if cp.returncode != 0:
        err = (cp.stderr.strip().splitlines() or cp.stdout.strip().splitlines() or ["?"])[-1]
        raise UserError(f"--python {python}: {what} failed ({err})")


def verify(python: str) -> dict:
    """Import the installed strategy in exo's Python; what it pulled in, whether exo is there."""
    cp = _run(python, ["-c", VERIFY], "importing the strategy")
    try:
        return json.loads(cp.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        err = (cp.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"--python {python}: the installed strategy does not import ({err})") \
            from None


def install(python: str) -> tuple[EnvState, EnvState, dict]:
    """Install into `python`'s environment; refuse (and roll back) if anything of exo's changed."""
    before = probe(python)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = build_wheel(Path(tmp), {"toolkit_python": sys.executable,
                                        "toolkit_path": str(TOOLKIT_ROOT)})
        _pip(python, ["install", "--no-deps", "--no-index", "--force-reinstall", "--no-cache-dir",
                      str(wheel)], f"installing {DIST}")
    after = probe(python)
    diff = changes(before, after)
    if DIST not in after.dists:
        diff.append(f"{DIST} is not listed after installing it")
    if diff:
        _run(python, ["-m", "pip", "uninstall", "-y", DIST], "rolling back")
        raise UserError(f"--python {python}: refused, installing {DIST} changed exo's "
                        f"environment ({'; '.join(diff)}); it was uninstalled again")
    check = verify(python)
    foreign = [m for m in check["imported"] if m in FOREIGN]
    if foreign or (check["exo_installed"] and not check["subclass_of_exo"]):
        _run(python, ["-m", "pip", "uninstall", "-y", DIST], "rolling back")
        why = (f"importing it pulled in {', '.join(foreign)}" if foreign
               else "it does not subclass exo's PartitioningStrategy")
        raise UserError(f"--python {python}: refused, {why}; it was uninstalled again")
    return before, after, check


def uninstall(python: str) -> tuple[EnvState, EnvState]:
    before = probe(python)
    if DIST not in before.dists:
        raise UserError(f"--python {python}: {DIST} is not installed there")
    _pip(python, ["uninstall", "-y", DIST], f"uninstalling {DIST}")
    after = probe(python)
    diff = changes(before, after)
    if DIST in after.dists:
        diff.append(f"{DIST} is still listed")
    if diff:
        raise UserError(f"--python {python}: uninstalling {DIST} changed exo's environment "
                        f"({'; '.join(diff)})")
    return before, after


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other bad input
        raise UserError(f"exo-legacy install: {message} (see exo-bridge exo-legacy install --help)")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="exo-bridge exo-legacy install", description=(
        "Put the measured strategy into legacy exo's own environment without changing any of "
        "exo's packages (a stand-alone wheel without dependencies, checked before and after)."))
    ap.add_argument("--python", help="the Python of legacy exo's environment "
                    "(e.g. ~/exo/.venv/bin/python)")
    ap.add_argument("--uninstall", action="store_true", help="remove it again (same checks)")
    ap.add_argument("--wheel-out", metavar="DIR", help="only write the wheel into DIR (install "
                    "it on another machine with `pip install --no-deps FILE`)")
    return ap


def _main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.wheel_out:
        out = Path(args.wheel_out)
        if not out.is_dir():
            raise UserError(f"--wheel-out {out}: not a directory; create it first")
        print(build_wheel(out, None))
        return 0
    if not args.python:
        raise UserError("exo-legacy install: --python is required (the Python of legacy exo's "
                        "environment, e.g. ~/exo/.venv/bin/python)")
    if args.uninstall:
        _, after = uninstall(args.python)
        print(f"uninstalled {DIST} from {after.prefix}; {len(after.dists)} other distributions "
              "unchanged, pip check as before")
        return 0
    before, after, check = install(args.python)
    pins = ", ".join(f"{n} {after.dists[n]}" for n in
                     ("mlx", "mlx-lm", "transformers", "numpy") if n in after.dists)
    py = ".".join(map(str, after.python))
    print(f"installed {DIST} {after.dists[DIST]} into {after.prefix} (Python {py}) with no "
          f"dependencies: {len(before.dists)} distributions unchanged ({pins or 'no MLX'}); "
          f"pip check as before ({len(after.pip_check)} pre-existing problem(s))")
    print(f"legacy exo importable there: {'yes' if check['exo_installed'] else 'no'}; start it "
          f"with `{args.python} -m {PACKAGE} --plan PLAN -- <exo's arguments>` or the one-line "
          f"hook `from {PACKAGE} import strategy_from_env as RingMemoryWeightedPartitioning"
          "Strategy` in exo/main.py")
    return 0


main = guard(_main)

if __name__ == "__main__":
    sys.exit(main())
