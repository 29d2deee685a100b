"""Legacy exo's partitioning types, or compatible stand-ins when exo is not installed.

Legacy exo (the Python node, 2024 to early 2025) hands a `PartitioningStrategy` a `Topology`
and expects a list of `Partition(node_id, start, end)`: half-open fractions of the model in
execution order. When `exo` is importable we use exo's own classes, so a strategy built here is
an instance of exo's abstract base and its partitions are exo's dataclass; otherwise the small
classes below speak the same shapes (same attribute names, same methods the strategy uses).

`EXO_INSTALLED` says which one is in use. Nothing here imports MLX.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Set, Tuple


@dataclass
class _Partition:
    """A half-open fraction [start, end) of the model that one node runs."""

    node_id: str
    start: float
    end: float


class _PartitioningStrategy(ABC):
    """exo's interface: one method, `partition(topology) -> List[Partition]`."""

    @abstractmethod
    def partition(self, topology) -> List[_Partition]:
        ...


@dataclass
class _DeviceFlops:
    """TFLOPS from exo's static table by chip name (0 for a chip exo does not know)."""

    fp32: float = 0.0
    fp16: float = 0.0
    int8: float = 0.0


@dataclass
class _DeviceCapabilities:
    """What a legacy exo node advertises: `memory` is TOTAL memory in MB."""

    model: str = "Unknown Model"
    chip: str = "Unknown Chip"
    memory: int = 0
    flops: _DeviceFlops = field(default_factory=_DeviceFlops)


class _Topology:
    """Nodes (`node_id -> DeviceCapabilities`) and peer edges (no latency or bandwidth)."""

    def __init__(self) -> None:
        self.nodes: Dict[str, _DeviceCapabilities] = {}
        self.peer_graph: Dict[str, Set] = {}
        self.active_node_id = None

    def update_node(self, node_id: str, device_capabilities: _DeviceCapabilities) -> None:
        self.nodes[node_id] = device_capabilities

    def get_node(self, node_id: str) -> _DeviceCapabilities | None:
        return self.nodes.get(node_id)

    def all_nodes(self) -> Iterable[Tuple[str, _DeviceCapabilities]]:
        return self.nodes.items()

    def add_edge(self, from_id: str, to_id: str, description=None) -> None:
        self.peer_graph.setdefault(from_id, set()).add(to_id)


try:  # exo's own classes when legacy exo is installed
    from exo.topology.partitioning_strategy import Partition, PartitioningStrategy  # type: ignore
    from exo.topology.topology import Topology  # type: ignore
    from exo.topology.device_capabilities import DeviceCapabilities, DeviceFlops  # type: ignore

    EXO_INSTALLED = True
except Exception:  # not installed, or the current exo (which has no such modules)
    Partition = _Partition  # type: ignore[misc]
    PartitioningStrategy = _PartitioningStrategy  # type: ignore[misc]
    Topology = _Topology  # type: ignore[misc]
    DeviceCapabilities = _DeviceCapabilities  # type: ignore[misc]
    DeviceFlops = _DeviceFlops  # type: ignore[misc]
    EXO_INSTALLED = False


def make_topology(nodes: Dict[str, int]) -> "Topology":
    """A topology from `{node_id: memory_MB}` (for tests, previews and the `strategy-check`)."""
    topo = Topology()
    for node_id, memory_mb in nodes.items():
        flops = DeviceFlops(fp32=0.0, fp16=0.0, int8=0.0)  # keywords: exo's are pydantic
        topo.update_node(node_id, DeviceCapabilities(model="unknown", chip="unknown",
                                                     memory=int(memory_mb), flops=flops))
    return topo
