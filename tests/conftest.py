"""Shared test fixtures. Tests use real MLX, real files, real processes; nothing is mocked."""
