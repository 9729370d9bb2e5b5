"""The bf16 materialising baselines (benchmarks/baselines.py) on the CPU: the loss and gradients of
the spec, matmuls in the input dtype with the softmax / LSE in fp32, exactly the model's GEMM FLOPs,
torch.compile, and the providers' skip reasons where they do not run."""

from __future__ import annotations

import collections
import contextlib
from typing import Optional

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import baselines
import flops
import providers
import specs
from tests.benchmarks.helpers import gemm_flops_run, tiny_case
from tests.utils import TOLERANCES

LOSSES = list(specs.SPECS)
_GEMMS = {"mm", "bmm", "addmm", "baddbmm", "matmul"}
#: Ops that exponentiate logits: an LSE, a softmax or its log, a log-sigmoid; their inputs must be fp32.
_EXPONENTIAL = {"exp", "logsumexp", "_softmax", "_log_softmax", "log_sigmoid_forward"}
#: Pairwise losses that exponentiate nothing: KoLeo's reduction of its logits is an argmax.
_NO_EXPONENTIAL = {"koleo"}
#: Products after the softmax, in fp32 as the softmax's output: lightly's DINO sums its cross-entropy
#: over crop pairs with an einsum of the probabilities (T·S·B·K, against the logits' S·B·K·D); one
#: product forward and one backward.
_FP32_PRODUCTS_AFTER_SOFTMAX = {"dino": 2}


class _DtypeRecorder(TorchDispatchMode):
    """Records (op name, input dtypes) of every aten op run below autograd, backward included."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        dtypes = tuple(a.dtype for a in args if isinstance(a, torch.Tensor))
        self.calls[(func.overloadpacket.__name__, dtypes)] += 1
        return func(*args, **(kwargs or {}))


def _run(loss: str, provider: str, dtype: str, recorder: Optional[TorchDispatchMode] = None
         ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The loss and its gradients; the call alone (not building the inputs) under `recorder`."""
    case = tiny_case(loss, provider, "fwd+bwd", dtype)
    inputs = providers.make_inputs(case)
    with recorder or contextlib.nullcontext():
        value = providers.loss_function(loss, provider)(*inputs)
        return value, torch.autograd.grad(value, [t for t in inputs if t.requires_grad])


@pytest.mark.parametrize("loss", LOSSES)
def test_baseline_is_the_spec_in_fp32(loss: str) -> None:
    """In fp32 every step of the baseline is fp32, so it must give the reference's loss and gradients."""
    value, grads = _run(loss, "materialising-bf16", "float32")
    ref_value, ref_grads = _run(loss, "reference", "float32")
    rtol, atol = TOLERANCES[torch.float32]
    assert value.dtype == torch.float32 and value.dim() == 0
    torch.testing.assert_close(value, ref_value, rtol=rtol, atol=atol)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref_grad, rtol=rtol, atol=atol)


@pytest.mark.parametrize("loss", LOSSES)
def test_bf16_baseline_multiplies_in_bf16_and_exponentiates_in_fp32(loss: str) -> None:
    recorder = _DtypeRecorder()
    value, grads = _run(loss, "materialising-bf16", "bfloat16", recorder)
    gemms = {(name, dtypes): count for (name, dtypes), count in recorder.calls.items() if name in _GEMMS}
    bf16 = [key for key in gemms if set(key[1]) == {torch.bfloat16}]
    assert bf16, f"no bf16 matmul recorded: {gemms}"
    after_softmax = sum(count for key, count in gemms.items() if set(key[1]) == {torch.float32})
    assert after_softmax == _FP32_PRODUCTS_AFTER_SOFTMAX.get(loss, 0), f"matmul operand dtypes {gemms}"
    assert len(bf16) + (after_softmax > 0) == len(gemms), f"matmul operand dtypes {gemms}"
    exponentials = [(name, dtypes) for (name, dtypes) in recorder.calls if name in _EXPONENTIAL]
    assert all(set(dtypes) == {torch.float32} for _, dtypes in exponentials), exponentials
    if specs.SPECS[loss].family in ("pairwise", "prototype") and loss not in _NO_EXPONENTIAL:
        assert exponentials, "a pairwise or prototype loss without an LSE or softmax"
    assert value.dtype == torch.float32 and all(g.dtype == torch.bfloat16 for g in grads)
    # bf16 logits cost accuracy, not correctness: the spec's value and gradients within bf16 tolerance.
    ref_value, ref_grads = _run(loss, "reference", "bfloat16")
    rtol, atol = TOLERANCES[torch.bfloat16]
    torch.testing.assert_close(value, ref_value, rtol=rtol, atol=atol)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("mode", specs.MODES)
@pytest.mark.parametrize("loss", LOSSES)
def test_baseline_runs_exactly_the_model_flops(loss: str, mode: str) -> None:
    case = tiny_case(loss, "materialising-bf16", mode, "bfloat16")
    assert gemm_flops_run(case) == flops.model_flops(case) == flops.route_flops(case)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch.compile's, not ours
def test_compiled_baseline_matches_eager() -> None:
    """One compile (NT-Xent, fp32 so that the comparison is tight): the compiled provider is the same
    function under torch.compile, not a fallback to eager or to the reference."""
    case = specs.Case("nt_xent", "materialising-bf16-compiled", "fwd+bwd", 32, 16, "float32")
    inputs = providers.make_inputs(case)
    compiled = providers.loss_function("nt_xent", "materialising-bf16-compiled")
    assert compiled.func._torchdynamo_orig_callable is baselines.nt_xent  # torch.compile's wrapper of the baseline
    value = compiled(*inputs)
    eager = providers.loss_function("nt_xent", "materialising-bf16")(*inputs)
    torch.testing.assert_close(value, eager, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(value, inputs)
    eager_grads = torch.autograd.grad(eager, inputs)
    for grad, eager_grad in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(grad, eager_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("provider", providers.MATERIALISING)
def test_baselines_say_why_they_do_not_run(provider: str) -> None:
    assert "GPU speed baselines" in providers.provider_unavailable(provider, "cpu", "nt_xent", 128, "bfloat16")
    assert "take bf16 inputs (got float32)" in providers.provider_unavailable(provider, "cuda", "clip", 256, "float32")
    assert providers.provider_unavailable(provider, "cuda", "barlow_twins", 8192, "bfloat16") is None
