"""Benchmarks of sfpo_kernels (a package so its conftest never shadows tests/conftest.py); see README.md."""
