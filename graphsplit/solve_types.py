"""Interchangeable nodes as types with counts: the state space of the exact split programs.

Problem. Real clusters often hold several identical machines on symmetric links. Two nodes d
and e are *twins* when swapping them changes none of the solver's cost arrays
(graphsplit.costmodel.ChainCosts): the same stage times and memory fit for every block range
(``comp``), head, embedding and pace, the same links to and from every other node, and the
same link each way between them (``out[d, e] = out[e, d]``, ``close[d, e] = close[e, d]``).
Swaps that leave the arrays unchanged are automorphisms, and automorphisms form a group, so
the twin relation is an equivalence relation: its classes are the *types*, and every
permutation of the nodes inside a type leaves the cost of every plan unchanged. A plan's cost
then depends only on its sequence of types, so the exact program may run over *multisets* of
types: state = (first type, count vector of the types used, current type, first block of the
current stage) instead of (first node, subset, node, block). With every type of size one the
count vectors are the subsets (bitmasks): one program serves both.

Two consecutive stages, or the last and the first, may be of the same type (two distinct nodes
of it): that transition costs the type's *internal* link (``out[t, t]``, ``close[t, t]``; +inf
for a type of one node). A type path is turned into nodes by giving the i-th use of a type its
i-th node in id order: nodes and types are both numbered in id order, so the answer does not
depend on how the cluster file lists the nodes. (Mixing type and node indices in this step, as
one published scheduler does, gives plans up to twice as slow: the tests check the typed
program against brute force with several nodes per type.)

Complexity. prod_t (n_t + 1) count vectors instead of 2^D subsets: 13 identical nodes give 14
states instead of 8192, 24 nodes in 4 types of 6 give 2401 instead of 16.8 million.

Relaxation. ``coarsen`` merges types into fewer groups whose arrays are the element-wise
minimum over their members (per-block times, links between distinct members, memory fit of any
member). Every real plan maps to a group plan that costs no more, so the exact program over the
groups gives a proven lower bound where the exact program over the types is too large.

Reference: PipeEdge (Hu et al., 2022) groups devices of one type in its DP; the grouping by
cost-array automorphisms and the count-vector state are this module's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INF = np.inf


def _twins(cc, d: int, e: int) -> bool:
    """Swapping nodes d and e leaves every cost array of cc unchanged."""
    if not (np.array_equal(cc.comp[d], cc.comp[e]) and np.array_equal(cc.prefix[d], cc.prefix[e])
            and cc.t_embed[d] == cc.t_embed[e] and cc.t_head[d] == cc.t_head[e]
            and cc.pace[d] == cc.pace[e]):
        return False
    others = np.array([x for x in range(cc.D) if x not in (d, e)], dtype=np.int64)
    for a in (cc.out, cc.close):
        if not (np.array_equal(a[d, others], a[e, others])
                and np.array_equal(a[others, d], a[others, e])
                and np.array_equal(a[d, e], a[e, d])):
            return False
    return True


def node_types(cc) -> list[list[int]]:
    """The twin classes of cc's nodes (indices), each sorted, ordered by their first node.

    O(D T) twin checks of O(D L) each (T types): the first node of each type stands for it,
    which is enough because twins form an equivalence relation (see the module docstring)."""
    types: list[list[int]] = []
    for d in range(cc.D):
        for t in types:
            if _twins(cc, t[0], d):
                t.append(d)
                break
        else:
            types.append([d])
    return types


@dataclass
class StateSpace:
    """Count vectors c (0 <= c_t <= n_t) numbered in mixed radix: state = sum_t c_t R_t.

    With every n_t = 1 the state numbers are the bitmasks of the subsets. ``levels[k]`` holds,
    for the states of total count k: (states, members, non-members, pad): members[i] are the
    types with c_t >= 1 and non-members the types with c_t < n_t, both padded to the widest
    state of the level by repeating the row's last entry (pad marks the repeated members)."""
    counts: np.ndarray
    radix: np.ndarray
    cnt: np.ndarray  # (n_states, T)
    full: int
    levels: dict

    @property
    def n_states(self) -> int:
        return self.cnt.shape[0]

    @property
    def total(self) -> int:
        return int(self.counts.sum())


def padded(mask: np.ndarray):
    """Per row, the column indices where mask holds (ascending), padded by the last one."""
    n = mask.sum(axis=1)
    W = int(n.max()) if n.size else 0
    srt = np.argsort(~mask, axis=1, kind="stable")[:, :max(W, 1)]
    take = np.minimum(np.arange(max(W, 1))[None, :], np.maximum(n - 1, 0)[:, None])
    return np.take_along_axis(srt, take, axis=1), np.arange(max(W, 1))[None, :] >= n[:, None]


def state_space(counts) -> StateSpace:
    """The count-vector states of types with `counts` nodes each (see StateSpace)."""
    counts = np.asarray(counts, dtype=np.int64)
    radix = np.concatenate([[1], np.cumprod(counts + 1)[:-1]]).astype(np.int64)
    n_states = int(np.prod(counts + 1))
    s = np.arange(n_states)
    cnt = (s[:, None] // radix[None, :]) % (counts + 1)[None, :]
    level = cnt.sum(axis=1)
    levels = {}
    for k in range(1, int(counts.sum()) + 1):
        Sk = np.nonzero(level == k)[0]
        mem, pad = padded(cnt[Sk] >= 1)
        non, _ = padded(cnt[Sk] < counts[None, :])
        levels[k] = (Sk, mem, non, pad)
    return StateSpace(counts, radix, cnt, int((counts * radix).sum()), levels)


def n_keys(counts) -> int:
    """States x types of the program over types with these counts (its size, before blocks)."""
    counts = np.asarray(counts, dtype=np.int64)
    return int(np.prod(counts + 1, dtype=float)) * len(counts)


class TypedCosts:
    """ChainCosts over types: the arrays the exact programs read, indexed by type.

    ``comp, prefix, t_embed, t_head, pace``: of the type (its members' common arrays, or their
    element-wise minimum for a merged group); ``out[t, q]`` and ``close[t, q]``: from a node of
    t to a distinct node of q (t = q: the type's internal link, +inf for one node);
    ``lower_bound``: the node-level per-block bound. ``members[t]``: node indices of cc (id
    order); ``space``: the count-vector states; ``exact``: True when the types are twin classes
    (the program is exact), False for merged groups (a relaxation: a lower bound)."""

    def __init__(self, cc, groups: list[list[int]], exact: bool):
        self.cc, self.members, self.exact = cc, groups, exact
        self.L, self.D = cc.L, len(groups)
        self.ids = [cc.ids[g[0]] for g in groups]
        self.type_of = np.empty(cc.D, dtype=np.int64)
        for t, g in enumerate(groups):
            self.type_of[g] = t
        self.lower_bound = cc.lower_bound
        if exact:
            rep = [g[0] for g in groups]
            self.comp, self.prefix = cc.comp[rep], cc.prefix[rep]
            self.t_embed, self.t_head, self.pace = cc.t_embed[rep], cc.t_head[rep], cc.pace[rep]
        else:
            self._merge_nodes(cc, groups)
        self._links(cc, groups)
        self.space = state_space([len(g) for g in groups])
        self.n_keys = n_keys(self.space.counts)  # the program's size (states x types)

    def _links(self, cc, groups):
        """out and close between types: min over pairs of distinct member nodes (all equal
        for twins: then the first node of each type, and the first two for a type's own)."""
        T = self.D
        if self.exact:
            rep = np.array([g[0] for g in groups])
            self.out, self.close = cc.out[np.ix_(rep, rep)].copy(), cc.close[np.ix_(rep, rep)]
            for t, g in enumerate(groups):
                self.out[t, t], self.close[t, t] = \
                    (cc.out[g[0], g[1]], cc.close[g[0], g[1]]) if len(g) > 1 else (INF, INF)
            return
        self.out = np.full((T, T, self.L + 1), INF)
        self.close = np.full((T, T), INF)
        offd = ~np.eye(cc.D, dtype=bool)
        for t, g in enumerate(groups):
            for q, h in enumerate(groups):
                ok = offd[np.ix_(g, h)]
                if ok.any():
                    self.out[t, q] = cc.out[np.ix_(g, h)][ok].min(axis=0)
                    self.close[t, q] = cc.close[np.ix_(g, h)][ok].min()

    def _merge_nodes(self, cc, groups):
        """Element-wise minima that keep a stage's time a prefix difference (the programs'
        range queries need it): per-block minimum times, embedding, head and pace minima, and
        a block range admissible when it fits any member's memory."""
        L = self.L
        blocks = np.diff(cc.prefix, axis=1)
        self.prefix = np.stack([np.concatenate([[0.0], np.cumsum(blocks[g].min(axis=0))])
                                for g in groups])
        self.t_embed = np.array([cc.t_embed[g].min() for g in groups])
        self.t_head = np.array([cc.t_head[g].min() for g in groups])
        self.pace = np.array([cc.pace[g].min() for g in groups])
        comp = self.prefix[:, None, :] - self.prefix[:, :, None]
        comp[:, 0, :] += self.t_embed[:, None]
        comp[:, :, L] += self.t_head[:, None]
        fits = np.stack([np.isfinite(cc.comp[g]).any(axis=0) for g in groups])
        self.comp = np.where(fits, comp, INF)

    def type_path(self, path):
        """A node path (cc indices) as a type path."""
        return [(int(self.type_of[d]), b, c) for d, b, c in path]

    def node_path(self, path):
        """A type path as a node path: the i-th use of a type runs on its i-th node (id
        order). Exact types only (a merged group's plan is not a plan of the nodes)."""
        used = [0] * self.D
        out = []
        for t, b, c in path:
            out.append((self.members[t][used[t]], b, c))
            used[t] += 1
        return out


def typed_costs(cc) -> TypedCosts:
    """The twin types of cc as TypedCosts (computed once per ChainCosts)."""
    tc = getattr(cc, "_typed", None)
    if tc is None or tc.cc is not cc:  # (a copy of cc, e.g. without_nodes_above, rebuilds)
        tc = TypedCosts(cc, node_types(cc), exact=True)
        cc._typed = tc
    return tc


def as_typed(costs) -> TypedCosts:
    """TypedCosts as is; a ChainCosts as one type per node (the plain bitmask program)."""
    if isinstance(costs, TypedCosts):
        return costs
    tc = getattr(costs, "_singletons", None)
    if tc is None or tc.cc is not costs:
        tc = TypedCosts(costs, [[d] for d in range(costs.D)], exact=True)
        costs._singletons = tc
    return tc


def coarsen(tc: TypedCosts, max_keys: int) -> TypedCosts:
    """A relaxation of tc with at most max_keys states x groups: types merged greedily, the
    cheapest merge first, until the program fits. A merged group runs as its fastest member
    per block and holds what its largest member holds, so merging types of unequal speed or
    memory loosens the bound: a merge costs (the spread of log total block time + the spread
    of log (1 + most blocks held) over the merged group) x its nodes, ties to the first pair
    (types in id order). Deterministic; merged arrays as in TypedCosts (exact=False).
    O(T^3) merge evaluations."""
    cc = tc.cc
    rep = [m[0] for m in tc.members]
    span = np.arange(tc.L + 1)[None, :] - np.arange(tc.L + 1)[:, None]
    held = np.where(np.isfinite(cc.comp[rep]), span[None], 0).max(axis=(1, 2))
    x = np.stack([np.log(np.maximum(cc.prefix[rep, -1], 1e-300)), np.log1p(held)], axis=1)
    groups = [[t] for t in range(tc.D)]

    def size(g):
        return sum(len(tc.members[t]) for t in g)

    while len(groups) > 1 and n_keys([size(g) for g in groups]) > max_keys:
        best = None
        for i in range(len(groups)):
            for j in range(i + 1, len(groups)):
                g = groups[i] + groups[j]
                cost = float(np.ptp(x[g], axis=0).sum()) * size(g)
                if best is None or cost < best[0]:
                    best = (cost, i, j)
        _, i, j = best
        groups[i] = sorted(groups[i] + groups[j])
        del groups[j]
    nodes = [sorted(d for t in g for d in tc.members[t]) for g in groups]
    return TypedCosts(cc, nodes, exact=False)
