"""DINO at its real head size, run in a fresh process so that its peak RSS is its own.

    python tests/scripts/large_dino.py IMAGES CROPS K D      (e.g. 1024 12 65536 256)

IMAGES x CROPS student crops (the first 2 are the global crops the teacher also sees), K prototypes
of dimension D: the student logits alone would be IMAGES·CROPS x K fp32 (3.2 GB at 1024 x 12 x
65,536). Embeddings and prototypes are L2-normalised, as DINO's head makes them (bottleneck output,
weight-normalised last layer); the teacher's W_t is a perturbed copy of W (an EMA network).

Prints one JSON line: the fp32 loss (default backend, forward + backward), the float64 loss of the
same inputs (torch backend in float64, chunked, forward only, after the peak was read), the peak RSS,
timings, and whether the gradients are finite.
"""

import json
import resource
import sys
import time

import torch
import torch.nn.functional as F

import fastssl

TEACHER_CROPS = 2

n_images, n_crops, k, dim = (int(a) for a in sys.argv[1:5])
gen = torch.Generator().manual_seed(0)
base = torch.randn(n_images, dim, generator=gen)
student = F.normalize(base + 0.8 * torch.randn(n_crops, n_images, dim, generator=gen), dim=-1)
teacher = F.normalize(student[:TEACHER_CROPS] + 0.1 * torch.randn(TEACHER_CROPS, n_images, dim, generator=gen), dim=-1)
prototypes = F.normalize(torch.randn(k, dim, generator=gen), dim=1)
teacher_prototypes = F.normalize(prototypes + 0.05 * torch.randn(k, dim, generator=gen), dim=1)
center = 0.1 * torch.randn(k, generator=gen)
student.requires_grad_()
prototypes.requires_grad_()

start = time.perf_counter()
loss = fastssl.dino_loss(student, teacher, prototypes, center, teacher_prototypes=teacher_prototypes)
forward_s = time.perf_counter() - start
loss.backward()
backward_s = time.perf_counter() - start - forward_s
peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB

with torch.no_grad():
    start = time.perf_counter()
    loss64 = fastssl.dino_loss(student.detach().double(), teacher.double(), prototypes.detach().double(),
                               center.double(), teacher_prototypes=teacher_prototypes.double(), backend="torch")
    float64_s = time.perf_counter() - start
grads = (student.grad, prototypes.grad)
print(json.dumps({
    "loss": loss.item(), "loss64": loss64.item(), "peak_rss_bytes": peak_rss, "forward_s": forward_s,
    "backward_s": backward_s, "float64_forward_s": float64_s,
    "grads_finite": all(bool(torch.isfinite(g).all()) for g in grads),
    "grad_norms": [float(g.norm()) for g in grads],
    "student_logits_bytes": n_images * n_crops * k * 4,
}))
