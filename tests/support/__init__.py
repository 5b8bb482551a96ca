"""Test and benchmark harness: real peers, data factories, tiny models, shared transforms.

Public helpers only (no fixtures: those are in the conftest.py files, built on these). The
benchmarks in bench/ may import this package; tests never import bench/."""
