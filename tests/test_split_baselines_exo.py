"""exo's own splits as baselines: legacy weighs memory in MB as exo does; current exo refuses where
its placement refuses (src/exo/master/placement.py, placement_utils.py at HEAD)."""

import pytest

from costtables import GiB, MiB, make_table
from graphsplit.api import baseline_entries
from graphsplit.baselines import ExoWouldRefuse, exo_current_stages, exo_legacy_stages
from graphsplit.cluster import cluster_from_tables
from graphsplit.costmodel import Workload
from graphsplit.plan import Stage


def test_legacy_weighs_total_memory_in_whole_mb():
    """exo's DeviceCapabilities.memory is total // 2**20: half a MB more is a tie in MB, and exo
    breaks the tie by node id (descending), so b runs first; weighing bytes put a first."""
    t = {"a": make_table("a", 8, memory_total=16 * GiB + 512 * 1024),
         "b": make_table("b", 8, memory_total=16 * GiB)}
    assert exo_legacy_stages(cluster_from_tables(t)) == [Stage("b", 0, 4), Stage("a", 4, 8)]


def _cluster(avail_gib, weight_mib=100, n=8):
    t = {f"n{i}": make_table(f"n{i}", n, weight_bytes=weight_mib * MiB,
                             memory_usable=int(a * GiB), embed_bytes=0, head_bytes=0)
         for i, a in enumerate(avail_gib)}
    return cluster_from_tables(t)


def test_exo_current_refuses_when_no_set_of_nodes_holds_the_model():
    c = _cluster([0.3, 0.4], weight_mib=100)  # 800 MiB of storage, 0.7 GiB available
    with pytest.raises(ExoWouldRefuse, match=r"^exo would refuse: no set of nodes"):
        exo_current_stages(c)


def test_exo_current_refuses_when_a_nodes_share_exceeds_its_memory():
    """Both together hold 3 layers of 390 MiB (1170 MiB in 1200 MiB), but largest remainder gives
    the first node 2 layers (tie to the earlier): 780 MiB > its 600 MiB; exo refuses that node."""
    c = _cluster([600 / 1024, 600 / 1024], weight_mib=390, n=3)
    with pytest.raises(ExoWouldRefuse, match=r"exo would refuse: node 0 \(n0\) needs 0\.76 GiB "
                                             r"for 2 layers but has 0\.59 GiB"):
        exo_current_stages(c)
    entry = baseline_entries(c, Workload(16, 64, 1), "exo-current")["exo-current"]
    assert entry["stages"] == [] and entry["error"].startswith("exo would refuse: node 0 (n0)")


def test_exo_current_places_when_every_share_fits():
    c = _cluster([600 / 1024, 600 / 1024], weight_mib=280, n=4)
    assert exo_current_stages(c) == [Stage("n0", 0, 2), Stage("n1", 2, 4)]


def test_split_model_shows_exos_refusal(tmp_path, capsys):
    from costtables import write_cluster
    from graphsplit.cli import main

    t = {f"n{i}": make_table(f"n{i}", 3, weight_bytes=390 * MiB, memory_usable=600 * MiB,
                             embed_bytes=0, head_bytes=0) for i in range(3)}
    # exo places on the smallest set that holds the storage (2 nodes) and refuses; ours uses 3
    assert main([str(write_cluster(tmp_path, t)), "--prompt-tokens", "16",
                 "--context-tokens", "64"]) == 0
    row = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("exo-current"))
    assert "(exo would refuse: node 0 (n0) needs 0.76 GiB for 2 layers" in row
