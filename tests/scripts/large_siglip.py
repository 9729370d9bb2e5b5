"""SigLIP at a size whose materialised logits would not fit: run in a fresh process so that its peak
RSS is its own (tests/backends/test_siglip_large.py).

    python tests/scripts/large_siglip.py N D

Forward + backward of fastssl.siglip_loss on the default backend (torch on the CPU) in fp32, with t
and b as tensors that require grad (as SigLIPLoss's learnable ones), at SigLIP's initialisation
t = 10, b = −10. Prints one JSON line: the fp32 loss, the float64 loss of the same inputs (torch
backend in float64, forward only, after the peak was read), the peak RSS, timings, gradient checks.
"""

import json
import resource
import sys
import time

import torch

import fastssl

n, dim = int(sys.argv[1]), int(sys.argv[2])
gen = torch.Generator().manual_seed(0)
z1 = torch.randn(n, dim, generator=gen)
z2 = z1 + 0.5 * torch.randn(n, dim, generator=gen)  # matching pairs, as after training a little
z1.requires_grad_()
z2.requires_grad_()
scale = torch.tensor(10.0, requires_grad=True)
bias = torch.tensor(-10.0, requires_grad=True)

start = time.perf_counter()
loss = fastssl.siglip_loss(z1, z2, scale, bias)
forward_s = time.perf_counter() - start
loss.backward()
backward_s = time.perf_counter() - start - forward_s
peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB

with torch.no_grad():
    loss64 = fastssl.siglip_loss(z1.detach().double(), z2.detach().double(), 10.0, -10.0, backend="torch")
grads = [z1.grad, z2.grad, scale.grad, bias.grad]
print(json.dumps({
    "loss": loss.item(), "loss64": loss64.item(), "peak_rss_bytes": peak_rss, "forward_s": forward_s,
    "backward_s": backward_s, "grads_finite": all(bool(torch.isfinite(g).all()) for g in grads),
    "grad_norm": float(z1.grad.norm()), "scale_grad": float(scale.grad), "bias_grad": float(bias.grad),
}))
