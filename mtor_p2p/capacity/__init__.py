"""Capacity: what compute a peer offers, how it is measured, signed, spread and queried."""
