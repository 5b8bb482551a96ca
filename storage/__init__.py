"""synthnode storage: SQLAlchemy index, durable file store, PS3.4 C.2.2.2 matching."""
