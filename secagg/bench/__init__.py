"""Benchmarks importable by the CLI; every one measures a plain baseline in the same run."""
