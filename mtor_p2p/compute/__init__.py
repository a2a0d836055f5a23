"""Compute: jobs, shards, workers, verification and contribution receipts."""
