"""synthnode node: DIMSE + DICOMweb services, ingest, routing, jobs, series builder,
dispatch, scheduler wiring, CLI and the composition root."""
