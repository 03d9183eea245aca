"""Triton kernels of kdfast, installed as ``kdfast.kernels`` (one module per op family).

The Triton backend is declared in :mod:`kdfast.dispatch` but has no kernels in this
release yet; ``kdfast.backends()`` reports it as not built.
"""
