"""Benchmarks (a package so its conftest does not collide with tests/conftest.py as `conftest`)."""
