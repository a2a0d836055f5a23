"""The CuPy backend's tests: on a lent GPU (marker ``gpu``) and against a stand-in (any machine)."""
