"""mtor-sim: the real peer code on virtual time (filled in below)."""
