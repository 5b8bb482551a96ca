"""Reuse the DICOMweb fixtures (``web``: a running node with DIMSE and HTTP)."""
from tests.node.dicomweb.conftest import web, web_factory  # noqa: F401
