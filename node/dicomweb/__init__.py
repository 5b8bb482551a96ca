"""DICOMweb server (PS3.18): STOW-RS, QIDO-RS, WADO-RS, rendered; scoped bearer tokens.

The package ``__init__`` imports nothing (see docs/architecture.md); the server is
assembled in :mod:`node.dicomweb.app`.
"""
