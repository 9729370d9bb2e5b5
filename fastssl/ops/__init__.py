"""Kernel-family ops: validation of kernel preconditions, backend dispatch, custom ops, autograd."""

from fastssl.ops.frobenius import SqFrobenius, sq_frobenius
from fastssl.ops.pairwise_lse import PairwiseLSE, pairwise_lse

__all__ = ["PairwiseLSE", "pairwise_lse", "SqFrobenius", "sq_frobenius"]
