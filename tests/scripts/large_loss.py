"""One loss at a size whose materialised matrix would not fit: run in a fresh process so that its
peak RSS is its own.

    python tests/scripts/large_loss.py LOSS N D      (LOSS: nt_xent, barlow_twins, spectral, vicreg_exp, arcl)

(arcl: N samples of m = 4 views, (N, 4, D).)

Prints one JSON line: the fp32 loss (default backend, forward + backward), the float64 loss of the
same inputs (torch backend in float64, forward only, after the peak was read), the peak RSS, timings.
"""

import json
import resource
import sys
import time

import torch

import fastssl

LOSSES = {
    "nt_xent": fastssl.nt_xent_loss,
    "barlow_twins": fastssl.barlow_twins_loss,
    "spectral": fastssl.spectral_contrastive_loss,
    "vicreg_exp": fastssl.vicreg_exp_loss,
    "arcl": fastssl.arcl_loss,
}
ARCL_VIEWS = 4

name, n, dim = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
loss_fn = LOSSES[name]
gen = torch.Generator().manual_seed(0)
z1 = torch.randn(n, dim, generator=gen)
z2 = z1 + 0.5 * torch.randn(n, dim, generator=gen)  # correlated views, as after training a little
if name == "spectral":  # inside the √μ ball, so the clip leaves most rows alone
    z1, z2 = z1 / (2 * dim**0.5), z2 / (2 * dim**0.5)
inputs = [z1, z2]
if name == "arcl":  # m views around one embedding per sample
    inputs = [z1[:, None] + 0.5 * torch.randn(n, ARCL_VIEWS, dim, generator=gen)]
for t in inputs:
    t.requires_grad_()

start = time.perf_counter()
loss = loss_fn(*inputs)
forward_s = time.perf_counter() - start
loss.backward()
backward_s = time.perf_counter() - start - forward_s
peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB

with torch.no_grad():
    loss64 = loss_fn(*(t.detach().double() for t in inputs), backend="torch")
grads_finite = all(bool(torch.isfinite(t.grad).all()) for t in inputs)
print(json.dumps({
    "loss": loss.item(), "loss64": loss64.item(), "peak_rss_bytes": peak_rss, "forward_s": forward_s,
    "backward_s": backward_s, "grads_finite": grads_finite, "grad_norm": float(inputs[0].grad.norm()),
}))
