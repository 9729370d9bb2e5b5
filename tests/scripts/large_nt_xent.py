"""NT-Xent at a size whose logits would not fit: run in a fresh process so its peak RSS is its own.

Prints one JSON line: the fp32 loss (default backend, forward + backward), the float64 loss of the
same inputs (torch backend in float64, forward only), the peak RSS and the timings.
"""

import json
import resource
import sys
import time

import torch

import fastssl

pairs, dim = int(sys.argv[1]), int(sys.argv[2])
gen = torch.Generator().manual_seed(0)
z1 = torch.randn(pairs, dim, generator=gen)
z2 = z1 + 0.5 * torch.randn(pairs, dim, generator=gen)  # correlated views, as after training a little
z1.requires_grad_()
z2.requires_grad_()

start = time.perf_counter()
loss = fastssl.nt_xent_loss(z1, z2)
forward_s = time.perf_counter() - start
loss.backward()
backward_s = time.perf_counter() - start - forward_s
peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB

with torch.no_grad():
    loss64 = fastssl.nt_xent_loss(z1.detach().double(), z2.detach().double())
grads_finite = bool(torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all())
print(json.dumps({
    "loss": loss.item(), "loss64": loss64.item(), "peak_rss_bytes": peak_rss, "forward_s": forward_s,
    "backward_s": backward_s, "grads_finite": grads_finite, "grad_norm": float(z1.grad.norm()),
}))
