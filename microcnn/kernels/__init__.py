"""Numba kernels only: no classes, no I/O. Import the submodule you need; nothing compiles at import."""
