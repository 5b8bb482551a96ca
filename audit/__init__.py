"""synthnode audit: tamper-evident ledger (RFC 9162 Merkle tree, signed checkpoints),
model admission gate, invisible watermark, audit exports."""
