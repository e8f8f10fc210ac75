"""Benchmarks: speed as a ratio against a baseline measured in the same run, fidelity beside it."""
