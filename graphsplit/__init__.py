"""Splitter: cost tables + cluster -> an optimal, explained pipeline plan. Knows nothing of MLX."""
