"""Legacy exo (the Python node, 2024 to early 2025): the measured `PartitioningStrategy`.

* strategy.py, launch.py: run inside legacy exo's process; standard library only.
* replan.py: re-planning with graphsplit, in the toolkit's environment (in process or as a
  subprocess of the toolkit's Python).
* install.py: `exo-bridge exo-legacy install --python EXO_PYTHON` puts strategy.py and launch.py
  into exo's environment as a stand-alone distribution without dependencies, and proves that
  nothing of exo's changed.
* cli.py: `exo-bridge exo-legacy` and `exo-bridge strategy-check`.
"""
