"""Bad input gets a TypeError/ValueError that names the argument and the shapes (never an assert,
a crash or a silent NaN); `backend=` is checked and keyword-only."""

from __future__ import annotations

import pytest
import torch

import fastssl
from fastssl import nn as fnn

Z = torch.randn(4, 3)


def pairs():
    """(name, function taking (z1, z2) and extra kwargs) for every two-view loss."""
    bank = torch.randn(5, 3)
    return [
        ("nt_xent", lambda a, b, **kw: fastssl.nt_xent_loss(a, b, **kw)),
        ("dcl", lambda a, b, **kw: fastssl.dcl_loss(a, b, **kw)),
        ("clip", lambda a, b, **kw: fastssl.clip_loss(a, b, **kw)),
        ("moco", lambda a, b, **kw: fastssl.moco_loss(a, b, bank, **kw)),
        ("alignment", lambda a, b, **kw: fastssl.alignment(a, b)),
        ("barlow_twins", lambda a, b, **kw: fastssl.barlow_twins_loss(a, b, **kw)),
        ("vicreg", lambda a, b, **kw: fastssl.vicreg_loss(a, b, **kw)),
        ("spectral", lambda a, b, **kw: fastssl.spectral_contrastive_loss(a, b, **kw)),
    ]


@pytest.mark.parametrize("name,fn", pairs())
@pytest.mark.parametrize(
    "z1,z2,error,match",
    [
        ([[1.0, 2.0]] * 4, Z, TypeError, "must be a torch.Tensor, got list"),
        (torch.randn(4, 3, 1), Z, ValueError, r"2 dimensions, got shape \(4, 3, 1\)"),
        (torch.randn(3), Z, ValueError, r"2 dimensions, got shape \(3,\)"),
        (torch.randn(5, 3), Z, ValueError, r"same shape, got \(5, 3\) and \(4, 3\)"),
        (torch.randn(4, 2), Z, ValueError, r"same shape, got \(4, 2\) and \(4, 3\)"),
        (torch.randn(1, 3), torch.randn(1, 3), ValueError, r"at least 2 rows .* shape \(1, 3\)"),
        (torch.randn(4, 0), torch.randn(4, 0), ValueError, r"D ≥ 1, got shape \(4, 0\)"),
        (torch.ones(4, 3, dtype=torch.int64), Z, TypeError, "got torch.int64"),
        (torch.ones(4, 3, dtype=torch.complex64), Z, TypeError, "got torch.complex64"),
        (Z.double(), Z, TypeError, "is torch.float64 but .* is torch.float32"),
        (torch.randn(4, 3, device="meta"), Z, ValueError, "is on meta but .* is on cpu"),
    ],
)
def test_bad_embeddings(name, fn, z1, z2, error, match):
    with pytest.raises(error, match=match):
        fn(z1, z2)


@pytest.mark.parametrize("name,fn", pairs()[:4])
@pytest.mark.parametrize("temperature", [0.0, -0.5, float("nan"), float("inf")])
def test_bad_temperature(name, fn, temperature):
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        fn(Z, Z, temperature=temperature)


@pytest.mark.parametrize("name,fn", pairs()[:4])
def test_unknown_backend_and_keyword_only(name, fn):
    with pytest.raises(ValueError, match=r"backend must be one of .*'gpu'"):
        fn(Z, Z, backend="gpu")
    if name != "moco":
        with pytest.raises(TypeError):
            fn(Z, Z, 0.5, "torch")  # backend is keyword-only


def test_bank_with_wrong_dimension():
    with pytest.raises(ValueError, match=r"same embedding dimension, got \(4, 3\) and \(7, 5\)"):
        fastssl.moco_loss(Z, Z, torch.randn(7, 5))
    with pytest.raises(ValueError, match=r"bank must have 2 dimensions"):
        fastssl.moco_loss(Z, Z, torch.randn(7))


def test_dcl_sigma_and_uniformity_arguments():
    with pytest.raises(ValueError, match="sigma must be a finite number > 0"):
        fastssl.dcl_loss(Z, Z, sigma=0.0)
    with pytest.raises(ValueError, match="t must be a finite number > 0"):
        fastssl.uniformity(Z, t=-1.0)
    with pytest.raises(ValueError, match=r"z needs at least 2 rows"):
        fastssl.uniformity(torch.randn(1, 3))


def test_tensor_temperature_shape():
    with pytest.raises(ValueError, match=r"1-element floating tensor, got torch.float32 of shape \(2,\)"):
        fastssl.clip_loss(Z, Z, torch.tensor([0.1, 0.2]))


TENSOR_TEMPERATURE_LOSSES = [
    ("nt_xent", lambda tau: fastssl.nt_xent_loss(Z, Z, tau)),
    ("dcl", lambda tau: fastssl.dcl_loss(Z, Z, tau)),
    ("clip", lambda tau: fastssl.clip_loss(Z, Z, tau)),
    ("moco", lambda tau: fastssl.moco_loss(Z, Z, torch.randn(5, 3), tau)),
    ("vicreg_exp", lambda tau: fastssl.vicreg_exp_loss(Z, Z, tau)),
    ("vicreg_ctr", lambda tau: fastssl.vicreg_ctr_loss(Z, Z, tau)),
    ("arcl", lambda tau: fastssl.arcl_loss(torch.randn(4, 3, 3), tau)),
]


@pytest.mark.parametrize("name,loss", TENSOR_TEMPERATURE_LOSSES)
@pytest.mark.parametrize("value", [-0.07, 0.0, float("nan"), float("inf")])
def test_bad_tensor_temperature_on_the_host(name, loss, value):
    """A CPU tensor's value costs no device sync, so it is checked like a float."""
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0, got a tensor holding"):
        loss(torch.tensor(value))


@pytest.mark.parametrize("value", [-0.07, 0.0, float("nan"), float("inf")])
def test_bad_device_temperature_gives_nan_never_a_plausible_loss(value):
    """Where reading τ would sync a GPU, the check is skipped and 1/τ becomes NaN instead (no value
    of a bad τ passes silently); FASTSSL_CHECK_FINITE=1 turns it into the ValueError."""
    from fastssl._validation import inverse_temperature

    scale = inverse_temperature(torch.tensor(value), Z)
    assert torch.isnan(scale)
    assert inverse_temperature(torch.tensor(0.5), Z) == 2.0


def test_device_temperature_is_read_only_when_checks_are_on(monkeypatch):
    """The rule for a tensor τ: read on the CPU always, elsewhere only under FASTSSL_CHECK_FINITE=1.
    A meta tensor stands in for a GPU one: reading its value would fail, so the check must not try."""
    from fastssl._validation import check_positive

    check_positive("temperature", torch.empty((), device="meta"))  # not read: no error, no sync
    monkeypatch.setenv("FASTSSL_CHECK_FINITE", "1")
    with pytest.raises((ValueError, RuntimeError, NotImplementedError)):
        check_positive("temperature", torch.empty((), device="meta"))


def test_triton_backend_explains_why_it_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton' cannot run here"):
        fastssl.nt_xent_loss(Z, Z, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(TypeError, match="float64"):
        fastssl.nt_xent_loss(Z.double(), Z.double(), backend="triton")


def test_non_finite_inputs_when_checks_are_on(monkeypatch):
    bad = Z.clone()
    bad[1, 2] = float("nan")
    monkeypatch.setenv("FASTSSL_CHECK_FINITE", "1")
    with pytest.raises(ValueError, match=r"z1 \(shape \(4, 3\)\) contains NaN or inf"):
        fastssl.nt_xent_loss(bad, Z)


def test_available_backends():
    names = fastssl.available_backends()
    assert names[-2:] == ["torch", "reference"]
    assert ("triton" in names) == (torch.cuda.is_available() or bool(__import__("os").environ.get("TRITON_INTERPRET")))


def test_module_arguments():
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0, got 0.0"):
        fnn.NTXentLoss(temperature=0.0)  # the functional API's message (lightly says "Illegal temperature")
    with pytest.raises(ValueError, match=r"memory_bank_size=128 does not give the embedding dimension"):
        fnn.NTXentLoss(memory_bank_size=128)
    with pytest.raises(ValueError, match=r"memory_bank_size entries must be >= 0, got \(-1, 3\)"):
        fnn.NTXentLoss(memory_bank_size=(-1, 3))
    with pytest.raises(ValueError, match="must be False, True or 'ring'"):
        fnn.DCLLoss(gather_distributed="all")
    with pytest.raises(ValueError, match="backend must be one of"):
        fnn.CLIPLoss(backend="cuda-please")
    with pytest.raises(ValueError, match="sigma must be a finite number > 0"):
        fnn.DCLWLoss(sigma=-1.0)
