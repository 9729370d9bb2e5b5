"""Triton kernels, one file per kernel family (DESIGN.md). Nothing here imports from fastssl.ops."""
