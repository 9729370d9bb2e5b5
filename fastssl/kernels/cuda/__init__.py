"""The `cuda` backend: thin Python adapters over the hand-written CUDA kernels of csrc/ (`fastssl._C`).

`_ext` finds or builds the extension; `pairwise_lse` and `frobenius` have the same functions and
contracts as fastssl.kernels.torch / fastssl.kernels.triton, so the custom ops of fastssl.ops
dispatch to them unchanged.
"""
