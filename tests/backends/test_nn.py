"""The nn.Module wrappers: they hold state and hyper-parameters and agree with the functional API."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastssl
from fastssl import nn as fnn
from fastssl import reference
from tests.utils import CPU_BACKENDS, LIGHTLY_AVAILABLE


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["reference"])
def test_modules_equal_functional(backend):
    z1, z2 = torch.randn(12, 7), torch.randn(12, 7)
    cases = [
        (fnn.NTXentLoss(0.3, backend=backend), fastssl.nt_xent_loss(z1, z2, 0.3, backend="torch")),
        (fnn.DCLLoss(0.2, backend=backend), fastssl.dcl_loss(z1, z2, 0.2, backend="torch")),
        (fnn.DCLWLoss(0.2, sigma=0.4, backend=backend), fastssl.dcl_loss(z1, z2, 0.2, sigma=0.4, backend="torch")),
        (fnn.CLIPLoss(0.1, backend=backend), fastssl.clip_loss(z1, z2, 0.1, backend="torch")),
    ]
    for module, want in cases:
        torch.testing.assert_close(module(z1, z2), want, rtol=2e-5, atol=1e-6, msg=lambda m: f"{module}: {m}")


def test_defaults_match_lightly():
    assert fnn.NTXentLoss().temperature == 0.5 and not fnn.NTXentLoss().memory_bank.enabled
    assert fnn.DCLLoss().temperature == 0.1 and fnn.DCLLoss().weight_fn is None
    assert fnn.DCLWLoss().temperature == 0.1 and fnn.DCLWLoss().sigma == 0.5
    assert fnn.CLIPLoss().temperature == 0.07


def test_memory_bank_queue_semantics():
    """Seeded init as lightly's; the bank seen by a step is the one before it; FIFO with lightly's wrap."""
    torch.manual_seed(3)
    loss_fn = fnn.NTXentLoss(memory_bank_size=(10, 4))
    torch.manual_seed(3)
    assert torch.equal(loss_fn.memory_bank.bank, F.normalize(torch.randn(10, 4), dim=-1))

    out0 = torch.randn(4, 4, requires_grad=True)
    out1 = torch.randn(4, 4)
    bank_before = loss_fn.memory_bank.bank.clone()
    loss = loss_fn(out0, out1)
    torch.testing.assert_close(loss, reference.moco_loss(out0, out1, bank_before, 0.5))
    assert torch.equal(loss_fn.memory_bank.bank[:4], F.normalize(out1, dim=1))
    assert int(loss_fn.memory_bank.bank_ptr) == 4

    loss_fn(out0, torch.randn(4, 4))  # ptr 4 -> 8
    last = torch.randn(4, 4)
    loss_fn(out0, last)  # 8 + 4 >= 10: fills rows 8, 9, drops the rest, restarts at 0
    assert torch.equal(loss_fn.memory_bank.bank[8:], F.normalize(last, dim=1)[:2])
    assert int(loss_fn.memory_bank.bank_ptr) == 0

    frozen = loss_fn.memory_bank.bank.clone()
    with torch.no_grad():
        loss_fn(out0.detach(), torch.randn(4, 4))  # evaluation: no update
    assert torch.equal(loss_fn.memory_bank.bank, frozen)


def test_memory_bank_gradients_do_not_reach_bank():
    loss_fn = fnn.NTXentLoss(memory_bank_size=(6, 3))
    out0, out1 = torch.randn(5, 3, requires_grad=True), torch.randn(5, 3, requires_grad=True)
    loss_fn(out0, out1).backward()
    assert out0.grad is not None and out1.grad is not None
    assert not loss_fn.memory_bank.bank.requires_grad


def test_dcl_custom_weight_fn():
    """A custom weight_fn is called on normalised views (both orders) and scales the positive term."""
    z1, z2 = torch.randn(6, 5), torch.randn(6, 5)
    calls = []

    def weight_fn(a, b):
        calls.append((a, b))
        return torch.full((a.shape[0],), 2.0)

    value = fnn.DCLLoss(0.3, weight_fn=weight_fn, backend="torch")(z1, z2)
    n1, n2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    assert len(calls) == 2 and torch.allclose(calls[0][0], n1) and torch.allclose(calls[1][0], n2)
    positive = (n1 * n2).sum(1) / 0.3
    unweighted = fastssl.dcl_loss(z1, z2, 0.3, backend="torch")
    torch.testing.assert_close(value, unweighted - positive.mean(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no custom weight_fn"):
        fnn.DCLLoss(weight_fn=weight_fn, backend="reference")(z1, z2)


def test_clip_learnable_temperature():
    loss_fn = fnn.CLIPLoss(temperature=0.2, learnable_temperature=True, backend="torch")
    assert math.isclose(float(loss_fn.logit_scale.detach()), math.log(5.0), rel_tol=1e-6)
    z1, z2 = torch.randn(8, 4), torch.randn(8, 4)
    loss = loss_fn(z1, z2)
    torch.testing.assert_close(loss, fastssl.clip_loss(z1, z2, 0.2, backend="torch"), rtol=1e-5, atol=1e-6)
    loss.backward()
    scale = torch.tensor(math.log(5.0), dtype=torch.float64, requires_grad=True)
    reference.clip_loss(z1.double(), z2.double(), torch.exp(-scale)).backward()
    torch.testing.assert_close(loss_fn.logit_scale.grad.double(), scale.grad, rtol=1e-4, atol=1e-6)


def test_extra_repr():
    assert "temperature=0.5" in repr(fnn.NTXentLoss()) and "backend='auto'" in repr(fnn.NTXentLoss())
    assert "memory_bank_size=(8, 2)" in repr(fnn.NTXentLoss(memory_bank_size=(8, 2)))
    assert "sigma=0.5" in repr(fnn.DCLWLoss())
    assert "temperature=learnable" in repr(fnn.CLIPLoss(learnable_temperature=True))


@pytest.mark.skipif(not LIGHTLY_AVAILABLE, reason="lightly is not installed (it needs torchvision, which does "
                    "not import beside the CPU torch 2.13 wheel); see README, 'Checking against lightly'")
@pytest.mark.parametrize("name", ["NTXentLoss", "DCLLoss", "DCLWLoss"])
def test_modules_match_lightly(name):
    import lightly.loss

    torch.manual_seed(7)
    ours = getattr(fnn, name)(backend="torch")
    theirs = getattr(lightly.loss, name)()
    z1, z2 = torch.randn(16, 32), torch.randn(16, 32)
    values, grads = [], []
    for module in (ours, theirs):
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        value = module(a, b)
        value.backward()
        values.append(value)
        grads.append((a.grad, b.grad))
    torch.testing.assert_close(values[0], values[1], rtol=1e-5, atol=1e-6)
    for g_ours, g_theirs in zip(grads[0], grads[1]):
        torch.testing.assert_close(g_ours, g_theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not LIGHTLY_AVAILABLE, reason="lightly is not installed (see test_modules_match_lightly)")
def test_memory_bank_training_matches_lightly():
    """Same seed, same steps: the same losses and the same bank, step after step."""
    import lightly.loss

    torch.manual_seed(11)
    ours = fnn.NTXentLoss(memory_bank_size=(20, 8), backend="torch")
    torch.manual_seed(11)
    theirs = lightly.loss.NTXentLoss(memory_bank_size=(20, 8))
    for _ in range(4):
        out0, out1 = torch.randn(6, 8, requires_grad=True), torch.randn(6, 8)
        torch.testing.assert_close(ours(out0, out1), theirs(out0, out1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.memory_bank.bank, theirs.memory_bank.bank)


# ---------------------------------------------------------------------------------------------------
# Constructor arguments: bad hyper-parameters fail at construction, naming the argument, in the
# style of fastssl._validation; every value lightly 1.6 accepts and that makes sense is accepted.
# ---------------------------------------------------------------------------------------------------

#: The hyper-parameters of every module: those that must be > 0 and those that must be >= 0.
POSITIVE_ARGS = {
    fnn.NTXentLoss: ["temperature"], fnn.DCLLoss: ["temperature"], fnn.DCLWLoss: ["temperature", "sigma"],
    fnn.CLIPLoss: ["temperature"], fnn.VICRegLoss: ["eps"], fnn.SpectralContrastiveLoss: ["mu"],
    fnn.VICRegExpLoss: ["temperature", "eps"], fnn.VICRegCtrLoss: ["temperature", "eps"], fnn.ArCLLoss: ["temperature"],
}
NONNEGATIVE_ARGS = {
    fnn.BarlowTwinsLoss: ["lambda_param"], fnn.VICRegLoss: ["lambda_param", "mu_param", "nu_param"],
    fnn.VICRegExpLoss: ["lambda_param", "mu_param", "nu_param"], fnn.VICRegCtrLoss: ["lambda_param", "mu_param", "nu_param"],
}
BAD_POSITIVE = [
    (0, ValueError, "must be a finite number > 0, got 0"), (-0.5, ValueError, "must be a finite number > 0, got -0.5"),
    (math.nan, ValueError, "must be a finite number > 0, got nan"), (math.inf, ValueError, "> 0, got inf"),
    (True, TypeError, "must be a float or a tensor, got bool"), ("0.5", TypeError, "got str"),
    (None, TypeError, "got NoneType"),
]
BAD_NONNEGATIVE = [
    (-1, ValueError, "must be a finite number >= 0, got -1"), (math.nan, ValueError, ">= 0, got nan"),
    (math.inf, ValueError, ">= 0, got inf"), (True, TypeError, "must be a float, got bool"),
    ("1", TypeError, "must be a float, got str"),
]
BAD_ARGUMENTS = (
    [(cls, name, value, exc, text) for cls, names in POSITIVE_ARGS.items() for name in names
     for value, exc, text in BAD_POSITIVE]
    + [(cls, name, value, exc, text) for cls, names in NONNEGATIVE_ARGS.items() for name in names
       for value, exc, text in BAD_NONNEGATIVE]
    + [(fnn.NTXentLoss, "memory_bank_size", value, exc, text) for value, exc, text in [
        ("big", TypeError, r"must be 0 or a \(K, D\) pair of ints, got str"),
        (None, TypeError, "pair of ints, got NoneType"), (0.0, TypeError, "pair of ints, got float"),
        (True, TypeError, "pair of ints, got bool"), (False, TypeError, "pair of ints, got bool"),
        ((8.0, 4), TypeError, r"got \(8.0, 4\) \(an entry of type float\)"),
        ((True, 4), TypeError, "an entry of type bool"), (("8", 4), TypeError, "an entry of type str"),
        ((8,), ValueError, r"pair of ints, got 1 entries \(8,\)"), ((8, 4, 2), ValueError, "got 3 entries"),
        ((), ValueError, "got 0 entries"), ((-8, 4), ValueError, r"entries must be >= 0, got \(-8, 4\)"),
        (-1, ValueError, "must be >= 0, got -1"),
        (128, ValueError, r"=128 does not give the embedding dimension: pass memory_bank_size=\(128, D\)"),
        ((8, 0), ValueError, r"=\(8, 0\): the embedding dimension D must be >= 1"),
    ]]
    + [(fnn.NTXentLoss, "temperature", 1e-9, ValueError, r"must be >= 1e-8 \(as in lightly 1.6's NTXentLoss\)")]
    # A CPU tensor τ is read like a float (no device sync): its sign is checked first.
    + [(fnn.NTXentLoss, "temperature", value, ValueError, r"must be a finite number > 0, got a tensor holding")
       for value in (torch.tensor(0.0), torch.tensor(-1.0))]
    + [(fnn.MemoryBankModule, "size", "big", TypeError, r"must be 0 or a \(K, D\) pair of ints, got str"),
       (fnn.DCLLoss, "weight_fn", "x", TypeError, "must be a callable or None, got str"),
       (fnn.DCLLoss, "weight_fn", 0, TypeError, "must be a callable or None, got int"),
       (fnn.CLIPLoss, "learnable_temperature", 1, TypeError, "must be True or False, got int"),
       (fnn.CLIPLoss, "learnable_temperature", "yes", TypeError, "must be True or False, got str")]
    # every module, in a fixed order (not a set's): xdist workers must collect the same list
    + [(cls, "backend", value, exc, text) for cls in dict.fromkeys([*POSITIVE_ARGS, *NONNEGATIVE_ARGS])
       for value, exc, text in [("gpu", ValueError, "must be one of .*, got 'gpu'"),
                                (None, TypeError, "must be one of .*, got NoneType")]]
)


@pytest.mark.parametrize("cls,name,value,exc,text", BAD_ARGUMENTS,
                         ids=[f"{c.__name__}-{n}={v!r}" for c, n, v, _, _ in BAD_ARGUMENTS])
def test_bad_constructor_argument_is_named(cls, name, value, exc, text):
    with pytest.raises(exc, match=f"^{name}" + r"\b.*" + text) as info:
        cls(**{name: value})
    assert len(str(info.value).splitlines()) == 1


def test_memory_bank_sizes_lightly_accepts():
    """0, (0,), (0, D) and (0, 0) are no bank; (K, D) as a tuple, list, torch.Size, numpy ints or array."""
    for size in (0, (0,), (0, 4), (0, 0)):
        assert not fnn.NTXentLoss(memory_bank_size=size).memory_bank.enabled, size
    for size in ((8, 4), [8, 4], torch.Size([8, 4]), (np.int64(8), 4), np.array([8, 4])):
        bank = fnn.NTXentLoss(memory_bank_size=size, backend="torch").memory_bank
        assert bank.size == (8, 4) and all(type(v) is int for v in bank.size) and bank.bank.shape == (8, 4), size
    assert fnn.MemoryBankModule(size=[6, 3]).size == (6, 3)


def test_numbers_lightly_accepts_give_the_same_loss():
    """Ints, numpy scalars (stored as Python numbers, which the kernels take) and, for τ, a 1-element tensor."""
    z1, z2 = torch.randn(8, 4), torch.randn(8, 4)
    for tau in (1, np.float32(1.0), np.int64(1), torch.tensor(1.0)):
        module = fnn.NTXentLoss(temperature=tau, backend="torch")
        assert not isinstance(module.temperature, np.generic)
        torch.testing.assert_close(module(z1, z2), fastssl.nt_xent_loss(z1, z2, 1.0, backend="torch"))
    vic = fnn.VICRegLoss(lambda_param=np.float32(0.5), mu_param=0, nu_param=np.int64(2), eps=np.float64(1e-3))
    assert (vic.lambda_param, vic.mu_param, vic.nu_param, vic.eps) == (0.5, 0, 2, 1e-3)
    assert type(vic.lambda_param) is float and type(vic.nu_param) is int
    torch.testing.assert_close(vic(z1, z2), fastssl.vicreg_loss(z1, z2, 0.5, 0, 2, 1e-3, backend="torch"))
    assert fnn.BarlowTwinsLoss(lambda_param=0).lambda_param == 0
    assert fnn.DCLWLoss(sigma=np.float32(0.25)).sigma == 0.25


def _lightly_accepts(make, z1, z2) -> bool:
    """The constructor returns and the forward gives a finite loss."""
    try:
        return bool(torch.isfinite(make()(z1, z2)))
    except (ValueError, TypeError, RuntimeError):
        return False


@pytest.mark.skipif(not LIGHTLY_AVAILABLE, reason="lightly is not installed (see test_modules_match_lightly)")
def test_accepted_arguments_match_lightly():
    """Every value that works in lightly works here, and nothing more, except the deliberate refusals:
    bools where a number is expected, non-finite numbers and numbers out of range (τ, σ, eps ≤ 0;
    λ, μ, ν < 0), on which lightly returns NaN, a constant, or a loss of the wrong sign."""
    import lightly.loss

    z1, z2 = torch.randn(8, 4), torch.randn(8, 4)
    positive = [0.5, 1, np.float32(0.5), torch.tensor(0.5), 0, 1e-9, torch.tensor(1e-9), -0.5, math.nan, math.inf,
                True, "0.5", None]
    nonnegative = [0, 5e-3, 1, np.float32(0.5), -1, math.nan, math.inf, True, "x", None]
    banks = [0, (0,), (0, 4), (0, 0), [8, 4], torch.Size([8, 4]), (np.int64(8), 4), 8, -1, True, False, (8,),
             (8, 4, 2), (-8, 4), "big", (8.0, 4), (True, 4), None, (8, 0), np.int64(0), 0.0]
    cases = ([("NTXentLoss", "temperature", v) for v in positive] + [("DCLLoss", "temperature", v) for v in positive]
             + [("DCLWLoss", "sigma", v) for v in positive] + [("VICRegLoss", "eps", v) for v in positive]
             + [("BarlowTwinsLoss", "lambda_param", v) for v in nonnegative]
             + [("VICRegLoss", k, v) for k in ("lambda_param", "mu_param", "nu_param") for v in nonnegative]
             + [("NTXentLoss", "memory_bank_size", v) for v in banks]
             + [("DCLLoss", "weight_fn", v) for v in (None, lambda a, b: torch.ones(a.shape[0]), "x", 0)])

    def deliberate(name, value):
        """fastssl refuses on purpose: a bool for a number, a non-finite or out-of-range number, a weight_fn
        that is not callable (lightly skips a falsy one such as 0)."""
        if name == "weight_fn":
            return value is not None and not callable(value)
        if name == "memory_bank_size" or not isinstance(value, (int, float)):
            return False
        if isinstance(value, bool) or not math.isfinite(value) or value < 0:
            return True
        return value == 0 and name in ("temperature", "sigma", "eps")

    differ = []
    for cls, name, value in cases:
        ours = _lightly_accepts(lambda: getattr(fnn, cls)(**{name: value}, backend="torch"), z1, z2)
        theirs = _lightly_accepts(lambda: getattr(lightly.loss, cls)(**{name: value}), z1, z2)
        if ours != theirs and not (theirs and deliberate(name, value)):
            differ.append(f"{cls}({name}={value!r}): fastssl {'accepts' if ours else 'refuses'}, lightly "
                          f"{'accepts' if theirs else 'refuses'}")
    assert not differ, "\n".join(differ)
