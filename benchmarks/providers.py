"""Who runs each case and how: provider availability, the loss callables (fastssl's backends, the
fp32 reference and the bf16 materialising baselines, each eager and compiled, lightly, Inf-CL), the
inputs, and the timed step.
"""

from __future__ import annotations

import functools
import importlib.util
import statistics
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import baselines
import env  # noqa: F401  (puts the checkout on sys.path before fastssl is imported)
import fastssl
from fastssl import backends, reference
from specs import IBOT_MASKED_PER_IMAGE, IBOT_PATCHES, SPECS, Case

#: The bf16 materialising baselines (baselines.py), eager and under torch.compile.
MATERIALISING = ("materialising-bf16", "materialising-bf16-compiled")
#: The same baselines at the input dtype (fp32): lightly's module formula as written, eager and compiled.
MATERIALISING_FP32 = ("materialising", "materialising-compiled")


def provider_unavailable(provider: str, device: str, loss: str, dim: Optional[int] = None,
                         dtype: Optional[str] = None) -> Optional[str]:
    """Why `provider` cannot benchmark `loss` on `device` (with embedding dimension `dim` and input
    `dtype`, where given), or None."""
    spec = SPECS[loss]
    if provider in MATERIALISING:
        if device != "cuda":
            return ("the bf16 materialising baselines are GPU speed baselines (bf16 tensor-core matmuls); a CPU "
                    "has no such path, and their formulas are checked on the CPU by tests/benchmarks")
        if dtype is not None and dtype != "bfloat16":
            return (f"the bf16 materialising baselines take bf16 inputs (got {dtype}): their matmuls run in the "
                    f"input dtype, so at fp32 they would be the fp32 reference's computation")
    if provider in MATERIALISING_FP32 and dtype == "bfloat16":
        return ("the formula baselines at bf16 are materialising-bf16 and its compiled twin (matmul in bf16, "
                "softmax / LSE in fp32, as torch.autocast runs them)")
    if provider.startswith("fastssl-"):
        backend = provider[len("fastssl-") :]
        kernels = importlib.import_module(f"fastssl.ops.{spec.op}")._KERNEL_MODULES
        if backend in backends.BACKENDS and backend != "auto" and backend not in kernels:
            return f"fastssl's {spec.op} op has no {backend!r} kernels (it has {', '.join(kernels)})"
        if backend == "triton" and device != "cuda":
            return "backend 'triton' needs CUDA tensors (the Triton CPU interpreter is not benchmarked)"
        if backend != "auto" and backend not in fastssl.available_backends():
            if backend not in backends.BACKENDS:
                return f"fastssl has no backend {backend!r} in this checkout (it has {backends.BACKENDS})"
            why = ""
            if backend == "cuda" and hasattr(backends, "cuda_unavailable_reason"):
                why = backends.cuda_unavailable_reason()
            return f"fastssl backend {backend!r} is not available here{f': {why}' if why else ''}"
        if not hasattr(fastssl, spec.function):
            return f"fastssl has no {spec.function} in this checkout"
    if provider == "lightly":
        if importlib.util.find_spec("lightly") is None:
            return "lightly is not installed (it needs torchvision; see README, 'Checking against lightly')"
        if spec.lightly is None:
            return "lightly 1.6 has no module for this loss that takes the same inputs"
    if provider == "inf_cl":
        if loss != "clip":
            return ("Inf-CL computes the CLIP loss only (no self-mask, so NT-Xent-style losses are not "
                    "comparable)")
        if importlib.util.find_spec("inf_cl") is None:
            return "Inf-CL (pip package inf-cl, module inf_cl) is not installed"
        if device != "cuda":
            return "Inf-CL's kernels are Triton GPU kernels: CUDA only"
        if dim is not None and dim % _inf_cl_head_dim(dim):
            return f"Inf-CL needs D to be a multiple of its head_dim (16..256), got D={dim}"
    return None


def _inf_cl_head_dim(dim: int) -> int:
    """Inf-CL splits D into heads of head_dim ∈ {16, 32, 64, 128, 256}: the largest that divides D."""
    return next((h for h in (256, 128, 64, 32, 16) if dim % h == 0), 256)


def _inf_cl_clip_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """CLIP loss through Inf-CL's ``cal_inf_loss`` (one direction per call), composed as Inf-CL
    (Cheng et al. 2024) does.

    Inf-CL scales the query rows and computes mean_i LSE_j(q_i·k_j) − q_i·k_i, in fp32 (its kernels
    upcast q and k; TF32 tensor cores). The temperature is folded into the query here rather than
    passed as ``scale=``: its ``scale`` path all-reduces the gradient and needs torch.distributed.
    """
    from inf_cl import cal_inf_loss

    a, b = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    head_dim = _inf_cl_head_dim(a.shape[1])
    return 0.5 * (cal_inf_loss(a / temperature, b, head_dim=head_dim) + cal_inf_loss(b / temperature, a, head_dim=head_dim))


#: What each provider's numbers mean beyond its name (extra_info["provider_note"]).
PROVIDER_NOTES = {
    "inf_cl": "Inf-CL upcasts to fp32 (TF32 tensor cores) and has no self-mask: CLIP loss only",
    "reference": "the fp32 spec (upcasts before the matmul): the accuracy baseline",
    "reference-compiled": "torch.compile(reference, dynamic=False): one static graph per shape and dtype",
    "materialising-bf16": "the formula users write (lightly's where it has the loss): bf16 matmul, fp32 LSE",
    "materialising-bf16-compiled": "torch.compile(materialising-bf16, dynamic=False): one static graph per shape",
    "materialising": "the same formula at the input dtype (fp32): lightly 1.6's module as written, or the paper's",
    "materialising-compiled": "torch.compile(materialising, dynamic=False): one static graph per shape",
    "lightly": "lightly 1.6 module with the loss's default arguments",
}


@functools.lru_cache(maxsize=None)
def _compiled(function: Callable) -> Callable:
    # Many shapes and dtypes per function: without a higher limit dynamo would silently fall back
    # to eager after 8 recompiles and the "compiled" numbers would be eager ones.
    config = torch._dynamo.config
    if hasattr(config, "recompile_limit"):
        config.recompile_limit = max(config.recompile_limit, 64)
    else:  # torch < 2.6
        config.cache_size_limit = max(config.cache_size_limit, 64)
    # dynamic=False: one static graph per shape, as a user with a fixed batch size gets.
    return torch.compile(function, dynamic=False)


# Losses whose fastssl and reference functions take the suite's inputs (make_inputs) in another
# form. Each adapter takes the function, then the suite's inputs, and passes keywords on.


def _two_views_as_list(fn: Callable, z1: torch.Tensor, z2: torch.Tensor, **kwargs) -> torch.Tensor:
    """FroSSL takes its views as a list."""
    return fn([z1, z2], **kwargs)


def _labels_second(fn: Callable, z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor, **kwargs) -> torch.Tensor:
    """SupCon takes (z1, labels, ..., z2=z2)."""
    return fn(z1, labels, z2=z2, **kwargs)


def _head_fastssl(fn: Callable, student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor,
                  teacher_weight: torch.Tensor, center: torch.Tensor, *mask: torch.Tensor, **kwargs) -> torch.Tensor:
    """DINO / iBOT from the raw weight v of the weight-normalised last layer (gain 1): fastssl normalises it."""
    return fn(student, teacher, weight, *mask, center, teacher_prototypes=teacher_weight, normalize_prototypes=True,
              **kwargs)


def _head_reference(fn: Callable, student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor,
                    teacher_weight: torch.Tensor, center: torch.Tensor, *mask: torch.Tensor) -> torch.Tensor:
    """The reference takes the normalised prototypes n(v) (rows), the weight-normalised layer's weight."""
    return fn(student, teacher, F.normalize(weight, dim=1), *mask, center,
              teacher_prototypes=F.normalize(teacher_weight, dim=1))


_ADAPTERS: dict[str, tuple[Callable, Callable]] = {  # loss -> (fastssl's adapter, the reference's)
    "frossl": (_two_views_as_list, _two_views_as_list),
    "supcon": (_labels_second, _labels_second),
    "dino": (_head_fastssl, _head_reference),
    "ibot": (_head_fastssl, _head_reference),
}


@functools.lru_cache(maxsize=None)
def _reference_function(loss: str) -> Callable:
    """fastssl.reference's function of `loss`, taking the suite's inputs (one object per loss, so that
    torch.compile caches one wrapper per loss)."""
    spec = SPECS[loss]
    function = getattr(reference, spec.function)
    if loss not in _ADAPTERS:
        return function
    return functools.update_wrapper(functools.partial(_ADAPTERS[loss][1], function), function)


def loss_function(loss: str, provider: str, route: str = "auto") -> Callable:
    """The callable that computes `loss` for `provider` (on `route`), taking the tensors of make_inputs."""
    spec = SPECS[loss]
    kwargs = dict(spec.kwargs)
    if provider == "reference":
        return functools.partial(_reference_function(loss), **kwargs)
    if provider == "reference-compiled":
        return functools.partial(_compiled(_reference_function(loss)), **kwargs)
    if provider in ("materialising-bf16", "materialising"):
        return functools.partial(baselines.BY_LOSS[loss], **kwargs)
    if provider in ("materialising-bf16-compiled", "materialising-compiled"):
        return functools.partial(_compiled(baselines.BY_LOSS[loss]), **kwargs)
    if provider.startswith("fastssl-"):
        if spec.family == "frobenius":
            kwargs["route"] = route
        function = getattr(fastssl, spec.function)
        if loss in _ADAPTERS:
            function = functools.partial(_ADAPTERS[loss][0], function)
        return functools.partial(function, backend=provider[len("fastssl-") :], **kwargs)
    if provider == "lightly":
        import lightly.loss

        return getattr(lightly.loss, spec.lightly)()
    if provider == "inf_cl":
        return _inf_cl_clip_loss
    raise ValueError(f"unknown provider {provider!r}")


def make_inputs(case: Case) -> tuple[torch.Tensor, ...]:
    """Random inputs for `case` (fixed seed), built on the CPU then moved, requiring grad:

    "pair": z1, z2 (N, D); "moco": query, key (N, D) and an L2-normalised bank (K = 2N, D) without
    grad (lightly keeps its bank so); "single": z (2N, D), row-normalised (uniformity is defined on
    the sphere; unnormalised Gaussians would make every exp(−2‖z_i − z_j‖²) underflow); "views":
    (N, m, D).
    """
    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, case.dtype)
    spec = case.spec

    def leaf(*shape: int, grad: bool = True, normalise: bool = False) -> torch.Tensor:
        x = torch.randn(*shape, generator=gen)
        if normalise:
            x = F.normalize(x, dim=-1)
        return x.to(device=case.device, dtype=dtype).requires_grad_(grad)

    if spec.inputs == "single":
        return (leaf(case.batch, case.dim, normalise=True),)
    if spec.inputs == "views":
        return (leaf(case.n_pairs, spec.views, case.dim),)
    if spec.family == "prototype":
        return _prototype_inputs(case, leaf, gen)
    inputs = (leaf(case.n_pairs, case.dim), leaf(case.n_pairs, case.dim))
    if spec.inputs == "moco":
        inputs += (leaf(case.bank_rows, case.dim, grad=False, normalise=True),)
    if spec.inputs == "labelled":
        inputs += (torch.randint(0, SUPCON_CLASSES, (case.n_pairs,), generator=gen).to(case.device),)
    if spec.inputs == "tico":
        # The running covariance after earlier steps: aᵀa/N of an earlier batch of unit rows.
        earlier = F.normalize(torch.randn(case.n_pairs, case.dim, generator=gen), dim=1)
        inputs += ((earlier.T @ earlier / case.n_pairs).to(device=case.device, dtype=dtype),)
    return inputs


#: SupCon's classes (ImageNet's 1,000): labels drawn uniformly.
SUPCON_CLASSES = 1000


def _prototype_inputs(case: Case, leaf: Callable[..., torch.Tensor], gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """The prototype family's inputs: the embeddings that enter the head's last layer (unit rows, as
    DINO's and SwaV's heads normalise them before it), its weight, and each loss's extras.

    "crops" (DINO): student (S, B, D) with grad, teacher (T, B, D) (the teacher's global crops), the
    raw weight v (K, D) of the student's weight-normalised last layer with grad, the EMA teacher's
    v_t (K, D) and the centre c (K,) (a running mean of teacher logits). "tokens" (iBOT): student and
    teacher (M, D) masked tokens, v, v_t, c, and the mask (B, 14, 14) with IBOT_MASKED_PER_IMAGE True
    entries per image (fewer in the last). "swav": high-resolution (H, B, D) and low-resolution
    (L, B, D) crops with grad, the prototypes W (K, D) with unit rows (SwaV normalises them every
    step), with grad. "msn": anchors (V·B, D) with grad, targets (B, D), prototypes (K, D) with grad.
    """
    spec, k, d, b = case.spec, case.prototypes, case.dim, case.images
    if spec.inputs == "crops":
        teacher_views = spec.global_views
        return (leaf(spec.views, b, d, normalise=True), leaf(teacher_views, b, d, grad=False, normalise=True),
                leaf(k, d), leaf(k, d, grad=False), 0.1 * leaf(k, grad=False))
    if spec.inputs == "tokens":
        m = case.batch
        mask = torch.zeros(b, IBOT_PATCHES ** 2, dtype=torch.bool)
        for image in range(b):
            masked = min(IBOT_MASKED_PER_IMAGE, m - image * IBOT_MASKED_PER_IMAGE)
            mask[image, torch.randperm(IBOT_PATCHES ** 2, generator=gen)[:masked]] = True
        mask = mask.view(b, IBOT_PATCHES, IBOT_PATCHES).to(case.device)
        return (leaf(m, d, normalise=True), leaf(m, d, grad=False, normalise=True), leaf(k, d), leaf(k, d, grad=False),
                0.1 * leaf(k, grad=False), mask)
    if spec.inputs == "swav":
        high = spec.global_views
        return (leaf(high, b, d, normalise=True), leaf(spec.views - high, b, d, normalise=True),
                leaf(k, d, normalise=True))
    if spec.inputs == "msn":
        return leaf(case.batch, d), leaf(b, d, grad=False), leaf(k, d)
    raise ValueError(f"unknown prototype inputs {spec.inputs!r}")


def make_step(case: Case) -> Callable[[], None]:
    """A no-argument callable running one `case.mode` call and waiting for the device.

    "fwd" runs the forward with grad enabled (as in training: the graph and whatever it saves are
    built, then dropped); "fwd+bwd" also takes the gradients with torch.autograd.grad, so nothing
    accumulates into .grad between calls. Outputs are dropped inside, so a measured peak is the
    call's working memory above the inputs.
    """
    fn = loss_function(case.loss, case.provider, case.route)
    inputs = make_inputs(case)
    wrt = [t for t in inputs if t.requires_grad]
    sync = torch.cuda.synchronize if case.device == "cuda" else (lambda: None)

    if case.mode == "fwd":

        def step() -> None:
            fn(*inputs)
            sync()

    elif case.mode == "fwd+bwd":

        def step() -> None:
            torch.autograd.grad(fn(*inputs), wrt)
            sync()

    else:
        raise ValueError(f"unknown mode {case.mode!r}")
    return step

def time_step(step: Callable[[], None], reps: int, warmup: int = 1) -> float:
    """Median wall time of `step` in seconds over `reps` calls, after `warmup` calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)

