"""SwaV or MSN at a large head size, run in a fresh process so that its peak RSS is its own.

    python tests/scripts/large_swav_msn.py swav B K D      (H = 2 high-resolution crops, L = 6 low, queue 3·B)
    python tests/scripts/large_swav_msn.py msn B K D       (V = 8 anchor views of B images)

The inputs are L2-normalised rows and prototypes. Prints one JSON line: the fp32 loss (default
backend, forward + backward), the float64 loss of the same inputs (torch backend in float64,
chunked, forward only, after the peak was read), the peak RSS, timings, whether the gradients are
finite, and the bytes of the score / probability matrices a materialising implementation holds at
once in fp32 (every crop's or anchor's row against the K prototypes).
"""

import json
import resource
import sys
import time

import torch
import torch.nn.functional as F

import fastssl

loss_name, b, k, dim = sys.argv[1], *(int(a) for a in sys.argv[2:5])
gen = torch.Generator().manual_seed(0)
prototypes = F.normalize(torch.randn(k, dim, generator=gen), dim=1).requires_grad_()
base = torch.randn(b, dim, generator=gen)
if loss_name == "swav":
    high = F.normalize(base + 0.5 * torch.randn(2, b, dim, generator=gen), dim=-1).requires_grad_()
    low = F.normalize(base + 0.8 * torch.randn(6, b, dim, generator=gen), dim=-1).requires_grad_()
    queue = F.normalize(torch.randn(2, 3 * b, dim, generator=gen), dim=-1)
    inputs = (high, low, prototypes)
    dense_rows = 8 * b

    def loss_fn(backend="auto", cast=lambda t: t):
        return fastssl.swav_loss(cast(high), cast(low), cast(prototypes), cast(queue), backend=backend)
else:
    anchors = (base + 0.8 * torch.randn(8, b, dim, generator=gen)).reshape(8 * b, dim).requires_grad_()
    targets = base + 0.1 * torch.randn(b, dim, generator=gen)
    inputs = (anchors, prototypes)
    dense_rows = 8 * b

    def loss_fn(backend="auto", cast=lambda t: t):
        return fastssl.msn_loss(cast(anchors), cast(targets), cast(prototypes), backend=backend)

start = time.perf_counter()
loss = loss_fn()
forward_s = time.perf_counter() - start
loss.backward()
backward_s = time.perf_counter() - start - forward_s
peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB

with torch.no_grad():
    start = time.perf_counter()
    loss64 = loss_fn("torch", lambda t: t.detach().double())
    float64_s = time.perf_counter() - start
grads = [t.grad for t in inputs]
print(json.dumps({
    "loss": loss.item(), "loss64": loss64.item(), "peak_rss_bytes": peak_rss, "forward_s": forward_s,
    "backward_s": backward_s, "float64_forward_s": float64_s,
    "grads_finite": all(bool(torch.isfinite(g).all()) for g in grads),
    "grad_norms": [float(g.norm()) for g in grads],
    "dense_bytes": dense_rows * k * 4,
}))
