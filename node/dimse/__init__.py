"""DIMSE services (pynetdicom): server assembly (``server``), status codes (``status``),
access control, C-ECHO, C-STORE; query/retrieve and storage commitment plug in through
``server.default_services``."""
