"""Kernels, one file per family and backend. Nothing here imports from fastssl.ops."""
