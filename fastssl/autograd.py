"""The public autograd Functions, one per kernel family, for users who compose at that level.

`PairwiseLSE.apply(x, y, bank, scale, pos_offset, exclude_self, include_pos, y_negatives, backend)`
returns the per-row (lse, pos); see fastssl/ops/pairwise_lse.py for the exact definition.
`SqFrobenius.apply(a, b, route, backend)` returns ‖aᵀb‖²_F; see fastssl/ops/frobenius.py.
"""

from fastssl.ops.frobenius import SqFrobenius
from fastssl.ops.pairwise_lse import PairwiseLSE

__all__ = ["PairwiseLSE", "SqFrobenius"]
