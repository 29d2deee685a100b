"""Profiler: runs real MLX models layer by layer and writes a measured cost table.

Importing this package does not import MLX: `profiler.costtable` and `profiler.errors`
are plain Python so that the splitter can read cost tables without MLX.
"""
