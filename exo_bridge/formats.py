"""The bridge's small input files, checked field by field like the cost table, cluster and plan.

* node map (``--node-map``): ``{"plan node": "exo node id", ...}``, non-empty names;
* hostfile (``--hostfile``, ``MLX_HOSTFILE``): MLX's ring backend format, one list of
  ``"ip:port"`` addresses per rank (``[["10.0.0.1:5000"], ["10.0.0.2:5000"]]``), or mlx.launch's
  ``[{"ssh": "host", "ips": ["10.0.0.1"]}, ...]``, optionally as ``{"hosts": [...], "backend",
  "envs"}`` (mlx/_distributed_utils/common.py, ``Hostfile.from_file``).

Every problem is one UserError line naming the file, the field, what is wrong and how to fix it
(profiler.files reads the file: special files refused, strict JSON).
"""

from __future__ import annotations

from argparse import ArgumentTypeError
from pathlib import Path
from typing import Any

from profiler import fields as F
from profiler.errors import UserError
from profiler.files import read_json
from profiler.options import check_host

_NAME = F.Str(nonempty=True)
NODE_MAP = F.Map(_NAME, nonempty=True)


class _Address(F.Spec):
    """"host:port" with a non-empty host and a port in 1..65535."""

    def describe(self) -> str:
        return 'an address "ip:port" (port 1..65535)'

    def check(self, v, path):
        if not isinstance(v, str):
            self.fail(v, path)
        host, sep, port = v.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            self.fail(v, path)
        try:
            check_host(host)
        except ArgumentTypeError:
            self.fail(v, path)


ADDRESS = _Address()
RING_RANK = F.List(ADDRESS, nonempty=True)
LAUNCH_HOST = F.Obj({"ssh": _NAME, "ips": F.List(_NAME), "rdma": F.List(F.Opt(F.Str()))},
                    required=("ssh",), name='an object {"ssh": host, "ips": [...]}')
HOST = F.OneOf((RING_RANK, LAUNCH_HOST, ADDRESS),
               name='a list of "ip:port" addresses (ring) or {"ssh", "ips"} (mlx.launch)')
HOSTS = F.List(HOST, nonempty=True)
HOSTFILE = F.OneOf((HOSTS, F.Obj({"hosts": HOSTS, "backend": F.Str(), "envs": F.List(F.Str())},
                                 required=("hosts",), name='an object {"hosts": [...]}')),
                   name='a list of hosts, or an object {"hosts": [...]}')


def check_node_map(data: Any, what: str) -> dict[str, str]:
    """A parsed node map, checked; `what` names the file or option."""
    try:
        F.check(data, NODE_MAP)
    except F.FieldError as e:
        raise UserError(f"{what}: {e.path}: {e.problem}; write JSON {{\"plan node\": \"exo node "
                        "id\"}") from None
    return dict(data)


def read_node_map(path: str | Path) -> dict[str, str]:
    p = Path(path)
    what = f"--node-map {p}"
    return check_node_map(read_json(p, what, missing='write JSON {"plan node": "exo node id"}'),
                          what)


def check_hostfile(data: Any, what: str) -> list[Any]:
    """A parsed hostfile, checked; returns its list of hosts."""
    try:
        F.check(data, HOSTFILE)
    except F.FieldError as e:
        raise UserError(f"{what}: {e.path}: {e.problem}; write one list of \"ip:port\" per "
                        "rank, e.g. [[\"10.0.0.1:5000\"], [\"10.0.0.2:5000\"]]") from None
    return list(data["hosts"] if isinstance(data, dict) else data)


def read_hostfile(path: str | Path) -> list[Any]:
    """The hosts of a hostfile (ring or mlx.launch format), checked field by field."""
    p = Path(path)
    what = f"hostfile {p}"
    return check_hostfile(read_json(p, what), what)
