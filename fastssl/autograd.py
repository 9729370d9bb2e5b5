"""The public autograd Functions, one per kernel family, for users who compose at that level.

`PairwiseLSE.apply(x, y, bank, scale, flags, backend)` returns the per-row (lse, pos), with `flags`
a `PairwiseLSEFlags` (which columns enter each row's LSE); see fastssl/ops/pairwise_lse.py for the
exact definition, and its docstring for the precision of `include_pos=True`.
`SqFrobenius.apply(a, b, route, backend)` returns ‖aᵀb‖²_F; see fastssl/ops/frobenius.py.
`PrototypeCE` returns the student's LSE over K prototypes and the teacher's expected prototype
(family 4); see fastssl/ops/prototype_ce.py.
"""

from fastssl.ops.frobenius import SqFrobenius
from fastssl.ops.pairwise_lse import PairwiseLSE, PairwiseLSEFlags
from fastssl.ops.prototype_ce import PrototypeCE

__all__ = ["PairwiseLSE", "PairwiseLSEFlags", "SqFrobenius", "PrototypeCE"]
