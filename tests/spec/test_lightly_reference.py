"""fastssl.reference against lightly 1.6's loss modules: values and gradients, fp32, rtol 1e-5.

docs/design.md: where lightly has the loss, fastssl's value, defaults and argument names must match it.
lightly is not a dependency (nor installed in CI): the module is skipped, with the reason, without it.
Run it in a virtualenv with lightly (README, "Checking against lightly"):
``PYTHONPATH=. python -m pytest tests/spec/test_lightly_reference.py``.
"""

from __future__ import annotations

import importlib.util
import inspect
import warnings
from pathlib import Path

import pytest
import torch

lightly_loss = pytest.importorskip(
    "lightly.loss", reason="lightly is not installed; these tests compare fastssl.reference with lightly 1.6"
)


def _load_reference():
    try:
        from fastssl import reference

        return reference
    except ImportError:  # the package around it is broken or half-written: load the file alone
        path = Path(__file__).resolve().parents[2] / "fastssl" / "reference.py"
        spec = importlib.util.spec_from_file_location("_fastssl_reference_standalone", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


ref = _load_reference()

RTOL = 1e-5
SHAPES = [(8, 16), (33, 7), (5, 64)]


def _inputs(n, d, scale=1.0, shift=0.0):
    z1 = (torch.randn(n, d) * scale + shift).requires_grad_()
    z2 = (torch.randn(n, d) * scale + shift).requires_grad_()
    return z1, z2


def assert_same(ours, theirs, inputs, what):
    """Same value and same gradients w.r.t. every input (random upstream gradient: both are linear in it)."""
    torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=0.0, msg=lambda m: f"{what} value: {m}")
    g_out = torch.rand(())
    for i, (g_ours, g_theirs) in enumerate(
        zip(torch.autograd.grad(ours * g_out, inputs), torch.autograd.grad(theirs * g_out, inputs))
    ):
        atol = 1e-6 * max(1.0, float(g_theirs.abs().max()))  # entries near 0 have no relative precision
        torch.testing.assert_close(g_ours, g_theirs, rtol=RTOL, atol=atol, msg=lambda m: f"{what} grad {i}: {m}")


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("kwargs", [{}, {"temperature": 0.1}, {"temperature": 1.7}])
def test_nt_xent(n, d, kwargs):
    z1, z2 = _inputs(n, d)
    theirs = lightly_loss.NTXentLoss(**kwargs)(z1, z2)
    assert_same(ref.nt_xent_loss(z1, z2, **kwargs), theirs, (z1, z2), f"NTXentLoss({kwargs})")


@pytest.mark.parametrize("n,d,k", [(8, 16, 32), (33, 7, 5), (5, 64, 100)])
@pytest.mark.parametrize("kwargs", [{}, {"temperature": 0.2}])
def test_moco_memory_bank(n, d, k, kwargs):
    z1, z2 = _inputs(n, d)
    module = lightly_loss.NTXentLoss(memory_bank_size=(k, d), **kwargs)
    bank = module.memory_bank.bank.detach().clone()  # (K, D), read before the forward enqueues z2
    theirs = module(z1, z2)
    assert_same(ref.moco_loss(z1, z2, bank, **kwargs), theirs, (z1, z2), f"NTXentLoss(memory_bank_size, {kwargs})")


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("kwargs", [{}, {"temperature": 0.5}, {"temperature": 0.05}])
def test_dcl(n, d, kwargs):
    z1, z2 = _inputs(n, d)
    theirs = lightly_loss.DCLLoss(**kwargs)(z1, z2)
    assert_same(ref.dcl_loss(z1, z2, **kwargs), theirs, (z1, z2), f"DCLLoss({kwargs})")


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("kwargs", [{}, {"temperature": 0.3, "sigma": 1.0}, {"sigma": 0.1}])
def test_dclw(n, d, kwargs):
    z1, z2 = _inputs(n, d)
    sigma = kwargs.get("sigma", inspect.signature(lightly_loss.DCLWLoss).parameters["sigma"].default)
    temperature = kwargs.get("temperature", 0.1)
    with warnings.catch_warnings():  # lightly builds its weights with torch.tensor(tensor)
        warnings.simplefilter("ignore", UserWarning)
        theirs = lightly_loss.DCLWLoss(**kwargs)(z1, z2)
    ours = ref.dcl_loss(z1, z2, temperature, sigma=sigma)
    assert_same(ours, theirs, (z1, z2), f"DCLWLoss({kwargs})")


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("kwargs", [{}, {"lambda_param": 0.1}])
def test_barlow_twins(n, d, kwargs):
    z1, z2 = _inputs(n, d, scale=3.0, shift=1.0)
    theirs = lightly_loss.BarlowTwinsLoss(**kwargs)(z1, z2)
    assert_same(ref.barlow_twins_loss(z1, z2, **kwargs), theirs, (z1, z2), f"BarlowTwinsLoss({kwargs})")


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize(
    "kwargs", [{}, {"lambda_param": 10.0, "mu_param": 5.0, "nu_param": 2.0, "eps": 1e-3}]
)
def test_vicreg(n, d, kwargs):
    # column scales on both sides of std 1 so that the variance hinge is active for some columns
    z1, z2 = _inputs(n, d)
    with torch.no_grad():
        z1.mul_(torch.linspace(0.2, 3.0, d))
    theirs = lightly_loss.VICRegLoss(**kwargs)(z1, z2)
    assert_same(ref.vicreg_loss(z1, z2, **kwargs), theirs, (z1, z2), f"VICRegLoss({kwargs})")


@pytest.mark.parametrize(
    "ours,theirs",
    [
        (ref.nt_xent_loss, lightly_loss.NTXentLoss),
        (ref.dcl_loss, lightly_loss.DCLLoss),
        (ref.barlow_twins_loss, lightly_loss.BarlowTwinsLoss),
        (ref.vicreg_loss, lightly_loss.VICRegLoss),
    ],
)
def test_defaults_match_lightly(ours, theirs):
    mine = inspect.signature(ours).parameters
    for name, param in inspect.signature(theirs).parameters.items():
        if name in mine:
            assert mine[name].default == param.default, f"{ours.__name__}: default of {name}"
    if ours is ref.dcl_loss:
        sigma = inspect.signature(lightly_loss.DCLWLoss).parameters["sigma"].default
        assert sigma == 0.5  # the value fastssl's DCLWLoss must default to
