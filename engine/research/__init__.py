"""Research tooling: phantoms, degradation simulators, baselines, metrics, training, evaluation.

Never imported by the running node (tests/engine/test_runtime_split.py); the runtime the node
loads is ``engine.api``, ``engine.types``, ``engine.tasks``, ``engine.models``, ``engine.nets``
and ``engine.wavelet``.
"""
