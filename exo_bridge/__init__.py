"""Bridge: runs a measured plan on exo (legacy and current) and on MLX's distributed runtime."""
