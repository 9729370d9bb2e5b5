"""Kernels, one file per family and backend. Nothing here imports from fastssl.ops.

:class:`PairwiseLSEFlags` is the contract of the pairwise-LSE family (docs/design.md, family 1) that
every backend's `pairwise_lse_forward` / `pairwise_lse_backward` receives; :class:`PrototypeCEFlags`
is the options of the prototype cross-entropy family (family 4) that every `prototype_ce_forward`
receives.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence


class PairwiseLSEFlags(NamedTuple):
    """Which columns enter row i's LSE, and which gradients the backward must produce.

    With s_ij = scale·x_i·y_j and the positive column p(i) = (i + pos_offset) mod Ny:

    - ``pos_offset``: p(i)'s offset, already reduced into [0, Ny) by the op;
    - ``exclude_self``: column i is left out (x is y: SimCLR, DCL, uniformity);
    - ``include_pos``: s_i,p(i) is in the LSE (else only returned as `pos`: DCL, and the InfoNCE
      losses, which add it back through a softplus);
    - ``y_negatives``: the other y columns are in the LSE (False: only the positive and the bank, MoCo);
    - ``needs_dx`` / ``needs_dy``: the backward computes dx / dy; a gradient nobody needs (MoCo's
      key, a frozen tower) is returned empty, (0, D), and costs nothing.

    One hashable value, so that a flag is added in one place. The custom ops carry it as a list of
    ints (:meth:`to_list` / :meth:`from_list`): their schema has no tuple type.
    """

    pos_offset: int = 0
    exclude_self: bool = False
    include_pos: bool = True
    y_negatives: bool = True
    needs_dx: bool = True
    needs_dy: bool = True

    def to_list(self) -> list[int]:
        return [int(value) for value in self]

    @classmethod
    def from_list(cls, values: Sequence[int]) -> "PairwiseLSEFlags":
        offset, *switches = values
        return cls(int(offset), *(bool(v) for v in switches))


class PrototypeCEFlags(NamedTuple):
    """What the prototype cross-entropy forward computes besides lse_s, lse_t and P_t.

    - ``needs_ds``: the forward also returns P_s_i = Σ_k softmax_k(α_s·s_i·Wᵀ)·W_k (N, D), from which
      the backward forms ds = g·α_s·P_s; else P_s is returned empty, (0, D), and costs nothing (s needs
      no gradient: a frozen student, an evaluation under torch.no_grad).

    The teacher's prototypes and centre are optional tensors, not flags: None is their "off". One
    hashable value, as :class:`PairwiseLSEFlags`, so that an option is added in one place; the custom
    ops carry it as a list of ints (:meth:`to_list` / :meth:`from_list`).
    """

    needs_ds: bool = True

    def to_list(self) -> list[int]:
        return [int(value) for value in self]

    @classmethod
    def from_list(cls, values: Sequence[int]) -> "PrototypeCEFlags":
        return cls(*(bool(v) for v in values))
