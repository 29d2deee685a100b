"""The distributed runner: `exo-bridge run` (run.py: plans, processes, measured vs predicted) and
the program every rank executes (stage_worker.py: one pipeline stage under a runtime's per-token
protocol)."""
