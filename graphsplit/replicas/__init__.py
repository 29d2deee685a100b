"""Replicas: split the nodes into k independent pipelines, each serving a share of the streams.

Problem. Given D nodes and B streams, choose a set partition of (a subset of) the nodes into
replicas A_1..A_k, each replica's split (node order, subset, layer ranges, micro-batch) and its
streams b_j (sum b_j = B) to maximise the total throughput sum_j f(A_j, b_j), where f(A, b) is
the best single-pipeline throughput over the nodes of A serving b streams under the runtime's
batching pattern (graphsplit.batching.solve_serving, the inner solver; f(A, 0) = 0: a replica
with no streams is not run). Replicas share nothing: no stage of one talks to another, each
holds the KV of its own streams, and current exo runs each as its own instance.

Symmetry. Two nodes are interchangeable when swapping them changes nothing (same cost table,
memory, links to every other node and to each other); within a class any permutation is an
automorphism, so f(A, b) depends only on how many nodes of each class A holds, and a partition
only on the multiset of those count vectors. Partitions are enumerated by restricted growth
strings (Bell(D): 15 for 4 nodes, 4,140 for 8) and kept once up to symmetry.

Method (best-first). A partition's value is the knapsack over its blocks (the streams shared
optimally, O(k B^2), ties to the smaller slowest cycle) of f(A, b) where solved and an upper
bound U(A, b) where not: an upper bound on the partition's optimum that falls as entries are
solved. Partitions sit in a heap by that value; the top one is re-valued, and if its knapsack's
shares use only solved entries its value is exact and at least every other partition's bound:
the optimum, proven. Otherwise the (A, b) its shares use are solved (the inner solver, seeded
with the set's nearest solved b's plan) and it goes back. So f is solved only where a
partition that may still win needs it (e.g. 41 of 15 x 32 = 480 (set, streams) pairs for
mlx-pipeline on 4 unlike nodes and 32 streams; bench/bench_serving.py). exo-current's f(A, b)
for b past its batch cap (8) is f(A, 8) with the same plan, no solve: its prediction reads the
streams only through the served min(b, 8) (costmodel.predict, stage_memory).

Bounds, for one pipeline on A serving b streams at decode batch m (M = ceil(b / m) batches,
served = min(b, 8) for exo-current, else b; t_d,i(m) node d's time for block i at batch m as
the runtime's protocol charges it). (i) Memory: every block sits on one node of A, with its
weights and the KV of `served` streams (plus the node's least resident embedding/head), so
with n_d the most blocks node d can hold (smallest first) A needs sum_d n_d >= L, else
f(A, b) = 0; and a plan has at least s_min stages, the fewest nodes whose n_d reach L.
(ii) throughput = min(served / tpot, (served / M) / T_max) (costmodel.predict). tpot (the sum
of the stages' compute and transfers) >= P_m = max(sum_i min_d t_d,i(m), the L cheapest of
the nodes' n_d cheapest block times) + the cheapest embedding + the cheapest head, + (s_min -
1) cheapest cuts + the cheapest closure when s_min > 1 (node d's x_d blocks cost at least its
x_d cheapest; every step runs the embedding and head once and crosses every cut). T_max >=
max(P_m / |A|, T*), T* = min over integers x_d <= n_d, sum x_d = L, of max over used d of
(d's x_d cheapest block times + the cheapest cut or closure when s_min > 1) (a binary search
over its candidate values). exo-current runs no overlap: served / P_m. U(A, b) is the largest
over the batches m the runtime may run (1..b for mlx-pipeline, 1 for exo-legacy, the served
batch for exo-current, or --micro-batch). (iii) Micro-batch runtimes: a plan at batch m that
fits b streams fits b0 < b (less KV), and b / ceil(b / m) <= (b / b0) x b0 / ceil(b0 / m), so
its throughput at b is at most b / b0 times that at b0: f(A, b) <= max(f(A, b0) b / b0, the
(ii) bound over m > b0) once f(A, b0) is solved (proven). Each bound is checked against
brute-force f(A, b) in tests/test_split_replicas.py. mlx-pipeline's f(A, b) itself is solved
one micro-batch m at a time (solve_serving with that m), in decreasing order of the (ii) bound
at m, until the next bound cannot beat the best found: the same optimum in fewer DP runs.

Size (deterministic: a size, never a time). The best-first search runs when D <= 10 and the
partitions up to symmetry number at most MAX_PARTITIONS; it stops once the inner solves' work
(their DP states, SplitResult.nit) passes `max_work` with a real plan in hand (the one pipeline
on every node at B streams is the first); it then returns the best plan among the solved
entries, labelled `bound`, with the heap's top value (an upper bound on every partition) as the
throughput bound, and the gap. Past the size: k = 1..D replicas of nodes dealt in speed order
(snake order, fastest first), each solved exactly, labelled `bound` against min(sum_d 1 /
(L c_d), B / L_min) (throughput_upper_bound, valid for any replicas on the whole cluster).

Complexity: at most (distinct sets x B) inner solves (usually far fewer, above), + Bell(D)
partitions enumerated + O(P k B^2) for the P distinct partitions' knapsacks, once each and
again per re-valuation.
Reference: set partitions by restricted growth strings (Knuth, TAOCP 7.2.1.5); best-first with
lazily tightened bounds (A*, Hart, Nilsson & Raphael 1968, the admissible heuristic here an
upper bound).
"""

from graphsplit.replicas.bounds import _Bounds, throughput_upper_bound  # noqa: F401
from graphsplit.replicas.nodes import node_classes, set_partitions, subcluster  # noqa: F401
from graphsplit.replicas.search import (EXACT_MAX_NODES, MAX_PARTITIONS, MAX_WORK,  # noqa: F401
                                        Replica, ReplicaResult, solve_replicas)
from graphsplit.replicas.table import _Table  # noqa: F401
