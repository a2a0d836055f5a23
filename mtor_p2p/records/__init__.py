"""Signed and hashed records that several layers share: operand descriptions and the framing
of compute messages (``arrays``), contribution receipts (``receipts``) and fault proofs
(``faults``).

They live below both ``compute`` (which makes them) and ``ledger`` (which turns them into
credits), so that the ledger never imports the compute services.
"""
