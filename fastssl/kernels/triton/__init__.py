"""Triton kernels, one file per kernel family (docs/design.md). Nothing here imports from fastssl.ops."""
