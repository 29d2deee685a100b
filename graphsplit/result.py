"""Solver result objects (in the spirit of scipy.optimize.OptimizeResult)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from graphsplit.plan import Stage


@dataclass
class SplitResult:
    """What a solver returns.

    stages: the plan (execution order, half-open block ranges) or None when no plan exists;
    fun: the objective value (seconds; for throughput, 1 / tokens-per-second); optimal: proven
    optimal for the model the solver states; status: 0 optimal, 1 feasible but not proven
    optimal (time limit), 2 infeasible; message: one line; solve_s: wall time;
    nit: work done (states expanded, MILP nodes, plans evaluated); extra: solver specifics
    (e.g. the Pareto frontier).
    """
    stages: list[Stage] | None
    fun: float
    optimal: bool
    status: int
    message: str
    solver: str
    solve_s: float = 0.0
    nit: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    # INTERFACES I7 (helper `scale` defines them; added here minimally in the same shape):
    # "optimal-all-orders-subsets" | "optimal-given-order" | "bound" ("" = not stated)
    proven: str = ""
    lower_bound: float | None = None  # objective units
    gap: float | None = None  # (fun - lower_bound) / fun

    @property
    def success(self) -> bool:
        return self.stages is not None

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.solver, "optimal": self.optimal, "status": self.status,
             "message": self.message, "solve_s": round(self.solve_s, 6),
             "objective_value": self.fun, "work": self.nit}
        if self.proven:
            d.update(proven=self.proven, lower_bound=self.lower_bound, gap=self.gap)
        return d
