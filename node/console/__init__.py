"""The administrator and auditor console: server-rendered HTML pages under ``/console/`` on
the DICOMweb application (same process, tokens, scopes and TLS). See docs/console.md."""
