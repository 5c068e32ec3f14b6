"""Benchmarks of edgeinspect bundles: latency/memory and scoring placement (see benchmarks/README.md)."""
