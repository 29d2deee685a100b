"""An emulated heterogeneous cluster on one Linux machine (root): slow nodes, slow links, real TCP.

Each node is a network namespace `{prefix}-{node}` with one veth (`eth0`, 10.77.0.{i+1}/24)
plugged into a bridge inside a hub namespace `{prefix}-hub` (10.77.0.254), and a cgroup v1 CPU
group `/sys/fs/cgroup/cpu/{prefix}-{node}` whose `cfs_quota_us / cfs_period_us` is the node's
share of a core (0.5 = half-speed single-threaded MLX), with a short period (2-4 ms, see
`cfs_period_quota`) so that a node is as slow after idling as under continuous load. Nothing is created outside those
namespaces and cgroups, and nothing talks to any address but 10.77.0.0/24 inside them.

Links. `tc netem` is the usual tool, but kernels without `sch_netem` exist (this project's CI VM
has htb/tbf only), so links are emulated by a small relay in the hub namespace, one listening
port per directed connection: bytes read at time t from the sender go out at
`start = max(t, link_free); link_free = start + n / rate; deliver = link_free + latency`,
which is netem's "delay D rate R" per chunk. MLX's ring backend reads its hostfile per process,
so each rank gets its own hostfile in which its neighbours' addresses are the relay's ports for
(this rank -> neighbour); its own entry is its real address, where it listens. `profile-link`
measures the same relayed path, so a link's measured latency includes the relay's own overhead
(tens of microseconds), exactly as the runner sees it.

Lifetime: `with Testbed(spec) as tb:` creates everything and removes it on exit, on Ctrl-C /
SIGTERM / SIGHUP (signal handlers) and on failure; `atexit` covers the rest, and
`python -m exo_bridge.testbed down` removes anything left with the prefix (after a kill -9).

    python -m exo_bridge.testbed up --nodes fast:1.0,mid:0.5,slow:0.25 \\
        --link fast-mid:2ms:200mbit --default-link 5ms:100mbit      # holds until Ctrl-C
    python -m exo_bridge.testbed status
    python -m exo_bridge.testbed down

Modules: spec.py (nodes, links, CPU share -> CFS period and quota, their command-line forms),
system.py (can a testbed run here, shell steps, teardown / status by prefix), relay.py (the link
relay), bed.py (Testbed: build, run in a node, wire a ring, measure, remove), cli.py.
"""
