"""Durable ingest of received objects, shared by every receiving service (C-STORE, the
pipeline's own outputs, STOW-RS):
:mod:`.ingestor` (the durability contract), :mod:`.attributes` (what the index reads),
:mod:`.results` (outcomes and refusal reasons).

Import from the modules; this package imports nothing, so :mod:`node.context` can use
:mod:`.results` without importing the ingestor that depends on it.
"""
