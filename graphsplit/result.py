"""Solver result objects (in the spirit of scipy.optimize.OptimizeResult) and their labels.

Every solver says exactly what it proved (``SplitResult.proven``):

* ``"optimal-all-orders-subsets"``: no plan over any order and any subset of the nodes is better;
* ``"optimal-given-order"``: no plan that uses the nodes in the given order (a subsequence of it,
  the whole of it with use_all_nodes) is better;
* ``"bound"``: the plan is the best one found; ``lower_bound`` is a proven lower bound on every
  plan the solver was asked about and ``gap`` = (fun - lower_bound) / fun.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from graphsplit.plan import PROVEN, Stage

ALL_ORDERS, GIVEN_ORDER, BOUND = PROVEN
LABELS = {ALL_ORDERS: "proven optimal over all node orders and subsets",
          GIVEN_ORDER: "proven optimal for the given node order only",
          BOUND: "NOT proven optimal: best plan found"}


@dataclass
class SplitResult:
    """What a solver returns.

    stages: the plan (execution order, half-open block ranges) or None when no plan exists;
    fun: the objective value (seconds; for throughput, 1 / tokens-per-second); proven: what is
    proven (see the module docstring); lower_bound: a proven lower bound on the objective
    (= fun when optimal; None when nothing is known); gap: (fun - lower_bound) / fun;
    optimal: True only with the two optimal labels; status: 0 optimal, 1 feasible but not
    proven optimal, 2 infeasible; message: one line; solve_s: wall time; nit: work done
    (states expanded, MILP nodes, plans evaluated); extra: solver specifics (e.g. the Pareto
    frontier).
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
    proven: str = ""
    lower_bound: float | None = None
    gap: float | None = None

    def __post_init__(self):
        if not self.proven:  # a solver that says only optimal / not: the whole search space
            self.proven = ALL_ORDERS if self.optimal else BOUND
        if self.proven not in PROVEN:
            raise ValueError(f"proven {self.proven!r} is not one of {PROVEN}")
        self.optimal = self.proven != BOUND
        if self.optimal and self.lower_bound is None and self.status != 2:
            self.lower_bound = self.fun  # (a MILP split inside a block has no stages, a value)
        self.gap = gap(self.fun, self.lower_bound) if self.status != 2 else None

    @property
    def success(self) -> bool:
        return self.stages is not None

    def to_dict(self) -> dict[str, Any]:
        def num(x):
            return x if x is None or math.isfinite(x) else None

        return {"name": self.solver, "optimal": self.optimal, "proven": self.proven,
                "lower_bound": num(self.lower_bound), "gap": num(self.gap),
                "status": self.status, "message": self.message,
                "solve_s": round(self.solve_s, 6), "objective_value": self.fun, "work": self.nit}


def gap(fun: float, lower_bound: float | None) -> float | None:
    """(fun - lower_bound) / fun, >= 0; None when there is no finite bound."""
    if lower_bound is None or not math.isfinite(lower_bound) or not math.isfinite(fun):
        return None
    if fun <= 0:
        return 0.0
    return max(0.0, (fun - lower_bound) / fun)
