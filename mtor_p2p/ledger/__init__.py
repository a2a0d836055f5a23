"""The ledger: credits from receipts, stake, slashing and signed checkpoints."""
