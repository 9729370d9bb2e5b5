"""`python -m fastssl.train.throughput`: training images/s with fastssl's losses vs the reference loss.

One CIFAR-sized training shape: synthetic uint8 32x32x3 images (no data needed), the trainer's full step
(two augmented views on the device, encoder + projector forward, loss, backward, AdamW step), timed
after warm-up steps, for each loss with `--backend auto` (fastssl's fused kernels) and `--backend
reference` (the plain materialising formulas of docs/design.md). Images/s counts samples (each is embedded
in two views). Prints a table and, with --json PATH, writes the numbers with the device, versions and
settings. On a GPU the default settings are ResNet-18, batch 512, bf16 autocast; a smoke run on a CPU:
`--device cpu --steps 2 --batch 16 --model small-cnn`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

from fastssl.train.augment import Augment
from fastssl.train.engine import TrainError, _autocast_factory, _embed, Config, resolve_device, ssl_backward
from fastssl.train.losses import LOSSES, build_criterion, head_prototypes
from fastssl.train.models import build_model

__all__ = ["measure", "main"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(loss: str, backend: str, *, model: str = "resnet18", batch: int = 512, steps: int = 20, warmup: int = 5,
            device: str = "auto", precision: str = "auto", chunks: int = 1, seed: int = 0) -> dict:
    """Time `steps` training steps (after `warmup`) of `loss` on `backend`; returns a dict of numbers."""
    if steps < 1 or warmup < 0 or batch < 2:
        raise ValueError(f"need steps >= 1, warmup >= 0, batch >= 2; got {steps}, {warmup}, {batch}")
    dev = resolve_device(device)
    autocast = _autocast_factory(Config(precision=precision), dev)
    torch.manual_seed(seed)
    net = build_model(model).to(dev)
    crit = build_criterion(loss, 128, backend=backend)
    crit.module.to(dev)
    opt = torch.optim.AdamW(list(net.parameters()) + list(crit.module.parameters()), lr=1e-3)
    g = torch.Generator(device=dev).manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, generator=g, device=dev)
    aug = Augment(size=32, blur_p=0.0)
    plan = crit.views
    if plan.local_views or head_prototypes(loss):
        raise ValueError(f"the throughput tool times the losses of one projector output per view; {loss} needs "
                         "a prototype head and multi-crop (time it with python -m fastssl.train --loss dino)")
    key_net = net if plan.has_teacher else None  # keys from the same network: the loss is what is timed

    def step():
        views = aug.views(images, plan.global_views, g)
        keys = None
        if key_net is not None:
            with torch.no_grad(), autocast():
                keys = _embed(key_net, views[plan.teacher], autocast)
        opt.zero_grad(set_to_none=True)
        out = ssl_backward(net, views[plan.student], lambda zs: crit(zs, keys), chunks, autocast)
        opt.step()
        return out

    for _ in range(warmup):
        step()
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        last = step()
    _sync(dev)
    seconds = time.perf_counter() - t0
    return {
        "loss": loss, "backend": backend, "images_per_s": steps * batch / seconds, "step_ms": 1e3 * seconds / steps,
        "final_loss": float(last), "peak_memory_mib": (torch.cuda.max_memory_allocated(dev) / 2**20
                                                       if dev.type == "cuda" else None),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastssl.train.throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--losses", default="simclr,barlow", help="comma-separated --loss names (default: %(default)s)")
    p.add_argument("--backends", default="auto,reference", help="backends to compare (default: %(default)s)")
    p.add_argument("--model", default="resnet18", choices=("resnet18", "small-cnn"), help="(default: %(default)s)")
    p.add_argument("--batch", type=int, default=512, help="samples per step (default: %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="timed steps (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: %(default)s)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"), help="(default: %(default)s)")
    p.add_argument("--chunks", type=int, default=1, help="GradCache chunks (default: %(default)s)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    args = p.parse_args(argv)
    losses = [s.strip() for s in args.losses.split(",") if s.strip()]
    backends = [s.strip() for s in args.backends.split(",") if s.strip()]
    bad = [x for x in losses if x not in LOSSES]
    if bad:
        print(f"{p.prog}: error: unknown loss {bad[0]!r} (choose from {', '.join(LOSSES)})", file=sys.stderr)
        return 2
    results = []
    try:
        dev = resolve_device(args.device)
        for loss in losses:
            for backend in backends:
                r = measure(loss, backend, model=args.model, batch=args.batch, steps=args.steps, warmup=args.warmup,
                            device=args.device, precision=args.precision, chunks=args.chunks)
                results.append(r)
                print(f"{loss:11s} {backend:10s} {r['images_per_s']:10.1f} images/s  {r['step_ms']:9.1f} ms/step"
                      + (f"  {r['peak_memory_mib']:.0f} MiB" if r["peak_memory_mib"] is not None else ""), flush=True)
    except (TrainError, ValueError, TypeError, RuntimeError, NotImplementedError) as e:
        print(f"{p.prog}: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    for loss in losses:
        by = {r["backend"]: r for r in results if r["loss"] == loss}
        if "reference" in by and len(by) > 1:
            for b, r in by.items():
                if b != "reference":
                    print(f"{loss}: {b} is {r['images_per_s'] / by['reference']['images_per_s']:.2f}x the reference "
                          "backend's images/s")
    report = {
        "device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor(),
        "torch": torch.__version__, "model": args.model, "batch": args.batch, "steps": args.steps,
        "warmup": args.warmup, "precision": args.precision, "chunks": args.chunks, "image_shape": [3, 32, 32],
        "results": results,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
