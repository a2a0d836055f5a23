"""Bootstrap data shipped inside the wheel as ``mtor_p2p._bootstrap`` (no code lives here)."""
