"""Hybrid parallelism: tensor-parallel stages (groups of nodes with whole-KV-head shares each)
inside a measured pipeline. Plain Python, no MLX.

- `tables`: what one rank costs at a share (the cost table's `tensor_parallel` section, I2);
- `shares`: share vectors, MLP columns, what each runtime can run;
- `costs`: the cost model of a plan with tensor stages (the reference; `costmodel.predict`'s
  hook for stages carrying `tensor`);
- `groups`, `search`: the exact search (stages as groups, order, layers, shares);
- `brute`: the brute-force oracle the tests compare it with;
- `make`, `report`: `split-model --hybrid` and what it prints.
"""
