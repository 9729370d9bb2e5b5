"""Command line of `python -m fastssl.train`: every Config field as an option, with its default in --help.

Errors in options, paths or data are reported as one line on stderr (exit status 2), never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from fastssl.train.engine import Config, TrainError, train
from fastssl.train.losses import LOSSES

__all__ = ["build_parser", "config_from_args", "main"]

_D = Config()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + error
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _pair(text: str) -> tuple:
    try:
        lo, hi = (float(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers MIN,MAX, got {text!r}") from None
    return (lo, hi)


def _option(text: str) -> tuple:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    for cast in (int, float):
        try:
            return key.strip(), cast(value)
        except ValueError:
            pass
    low = value.strip().lower()
    if low in ("true", "false"):
        return key.strip(), low == "true"
    return key.strip(), value


def build_parser() -> argparse.ArgumentParser:
    losses = "\n".join(f"  {k:11s} {v[1]} (fastssl.nn.{v[0]})" for k, v in LOSSES.items())
    p = _Parser(
        prog="python -m fastssl.train",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Self-supervised training with fastssl's fused losses, then a linear probe and k-NN on frozen "
                    "features of the trained encoder and of the same encoder at random initialisation.\n"
                    "With no arguments: SimCLR on the embedded cluttered digits (no download), a few minutes on "
                    "a 2-core CPU.\nWrites OUT/log.jsonl (per step and epoch), OUT/checkpoint.pt (each epoch, "
                    "atomically) and OUT/summary.json; plot with `python -m fastssl.train.plot OUT`.",
        epilog=f"losses:\n{losses}\n\ndocs/trainer.md has the data formats, GradCache and measured results.")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default=_D.dataset, choices=("digits", "cifar10", "cifar100", "folder"),
                   help="digits: embedded UCI handwritten digits rendered into cluttered 32x32 RGB; cifar10/cifar100: "
                        "the python-pickle batches in --data-dir; folder: one sub-folder of images per class "
                        "(needs Pillow) (default: %(default)s)")
    d.add_argument("--data-dir", default=_D.data_dir, metavar="DIR",
                   help="folder of the cifar10/cifar100/folder dataset (default: none)")
    d.add_argument("--limit", type=int, default=_D.limit, metavar="N",
                   help="use only the first N train and N/3 test images, for smoke tests (default: all)")
    d.add_argument("--copies", type=int, default=_D.copies, metavar="K",
                   help="digits: render each train digit K times with independent nuisances (default: %(default)s)")
    d.add_argument("--clutter", type=float, default=_D.clutter,
                   help="digits: strength of the background colour noise and bars, 0 = none (default: %(default)s)")
    d.add_argument("--render-seed", type=int, default=_D.render_seed,
                   help="digits: seed of the split and the rendering (default: %(default)s)")
    m = p.add_argument_group("model")
    m.add_argument("--model", default=_D.model, choices=("small-cnn", "resnet18"),
                   help="encoder: small-cnn (4 conv layers, for the default data) or resnet18 (CIFAR variant) "
                        "(default: %(default)s)")
    m.add_argument("--width", type=int, default=_D.width,
                   help="base channel width (default: 16 for small-cnn, 64 for resnet18)")
    m.add_argument("--norm", default=_D.norm, choices=("bn", "gn", "ln", "none"),
                   help="normalisation layers; gn/ln make --chunks gradients exactly equal to the full batch's "
                        "(default: bn)")
    m.add_argument("--proj-hidden", type=int, default=_D.proj_hidden, help="projector hidden width (default: %(default)s)")
    m.add_argument("--proj-dim", type=int, default=_D.proj_dim, help="projector output width D (default: %(default)s)")
    lo = p.add_argument_group("loss")
    lo.add_argument("--loss", default=_D.loss, choices=tuple(LOSSES), help="SSL objective (default: %(default)s)")
    lo.add_argument("--backend", default=_D.backend, choices=("auto", "triton", "torch", "reference", "cuda"),
                    help="fastssl backend of the loss; reference is the plain materialising spec "
                         "(default: %(default)s)")
    lo.add_argument("--temperature", type=float, default=_D.temperature,
                    help="tau of the losses that have one (default: the loss module's default, listed below)")
    lo.add_argument("--views", type=int, default=_D.views, help="arcl: views per sample m >= 2 (default: 4)")
    lo.add_argument("--memory-bank", type=int, default=_D.memory_bank, metavar="K",
                    help="moco: memory bank length (default: %(default)s)")
    lo.add_argument("--moco-momentum", type=float, default=_D.moco_momentum,
                    help="moco: EMA momentum of the key encoder (default: %(default)s)")
    lo.add_argument("--teacher-momentum", type=float, default=_D.teacher_momentum, metavar="M0",
                    help="dino: EMA momentum of the teacher at the first step, rising to 1 on a cosine over the run "
                         "(default: %(default)s)")
    lo.add_argument("--local-crops", type=int, default=_D.local_crops, metavar="L",
                    help="dino: small crops per image besides the 2 global views; the student sees them, the teacher "
                         "does not (default: 2)")
    lo.add_argument("--local-size", type=int, default=_D.local_size, metavar="PX",
                    help="dino: side of the local crops in pixels (default: %(default)s)")
    lo.add_argument("--local-scale", type=_pair, default=_D.local_scale, metavar="MIN,MAX",
                    help="dino: area fraction of the image a local crop covers (default: 0.3,0.6)")
    lo.add_argument("--loss-option", action="append", type=_option, default=[], metavar="KEY=VALUE",
                    help="any other constructor argument of the loss module, repeatable, e.g. lambda_param=0.01 "
                         "(default: none)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=_D.epochs, help="training epochs (default: %(default)s)")
    o.add_argument("--batch-size", type=int, default=_D.batch_size, help="samples per step (default: %(default)s)")
    o.add_argument("--optimizer", default=_D.optimizer, choices=("adamw", "lars"), help="(default: %(default)s)")
    o.add_argument("--lr", type=float, default=_D.lr, help="peak learning rate (default: 3e-3 for adamw, "
                   "0.3 x batch/256 for lars)")
    o.add_argument("--weight-decay", type=float, default=_D.weight_decay,
                   help="on weights with >= 2 dims only (default: 1e-4 for adamw, 1e-6 for lars)")
    o.add_argument("--warmup-epochs", type=float, default=_D.warmup_epochs,
                   help="linear warm-up, then cosine decay to 0 (default: %(default)s)")
    o.add_argument("--chunks", type=int, default=_D.chunks, metavar="K",
                   help="GradCache: embed the batch in K chunks, loss + backward on the full batch, then "
                        "backpropagate each chunk; activation memory of one chunk (default: %(default)s)")
    o.add_argument("--precision", default=_D.precision, choices=("auto", "fp32", "bf16"),
                   help="autocast dtype of the encoder; auto = bf16 on CUDA, fp32 on CPU (default: %(default)s)")
    a = p.add_argument_group("augmentation (SimCLR's, CIFAR style)")
    a.add_argument("--crop-scale", type=_pair, default=_D.crop_scale, metavar="MIN,MAX",
                   help="random resized crop area fraction (default: 0.4,1.0)")
    a.add_argument("--flip-p", type=float, default=_D.flip_p, help="horizontal flip probability (default: %(default)s)")
    a.add_argument("--jitter-p", type=float, default=_D.jitter_p, help="colour jitter probability (default: %(default)s)")
    a.add_argument("--jitter", type=float, default=_D.jitter,
                   help="brightness, contrast and saturation strength (default: %(default)s)")
    a.add_argument("--hue", type=float, default=_D.hue,
                   help="hue jitter in turns, at most 0.5; the default data's colour nuisance is hue "
                        "(default: %(default)s)")
    a.add_argument("--gray-p", type=float, default=_D.gray_p, help="grayscale probability (default: %(default)s)")
    a.add_argument("--blur-p", type=float, default=_D.blur_p,
                   help="Gaussian blur probability (SimCLR uses 0.5 on ImageNet, 0 on 32x32) (default: %(default)s)")
    e = p.add_argument_group("evaluation")
    e.add_argument("--knn-k", type=int, default=_D.knn_k, help="neighbours of the k-NN classifier (default: %(default)s)")
    e.add_argument("--probe-wd", type=float, default=_D.probe_wd,
                   help="L2 penalty of the linear probe (default: %(default)s)")
    e.add_argument("--eval-every", type=int, default=_D.eval_every, metavar="E",
                   help="k-NN, alignment, uniformity, divergence every E epochs; 0 = only at the end "
                        "(default: %(default)s)")
    r = p.add_argument_group("run")
    r.add_argument("--device", default=_D.device, help="auto (cuda if available, else cpu), cpu, cuda, cuda:N "
                   "(default: %(default)s)")
    r.add_argument("--seed", type=int, default=_D.seed, help="seed of initialisation, batches and views "
                   "(default: %(default)s)")
    r.add_argument("--threads", type=int, default=_D.threads, help="torch CPU threads (default: torch's choice)")
    r.add_argument("--out", default=_D.out, metavar="DIR", help="run folder (default: %(default)s)")
    r.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint, with the same options; a larger --epochs "
                        "extends it (the warm-up + cosine LR schedule is re-planned for the new total)")
    r.add_argument("--save-every", type=int, default=_D.save_every, metavar="E",
                   help="checkpoint every E epochs and at the end; 0 = never (default: %(default)s)")
    r.add_argument("--log-every", type=int, default=_D.log_every, metavar="S",
                   help="write a step record to log.jsonl every S steps (default: %(default)s)")
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bar (it is off anyway when stderr is not a terminal)")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    kw = vars(args).copy()
    kw["loss_options"] = dict(kw.pop("loss_option"))
    return Config(**kw)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        train(config_from_args(args))
    except (TrainError, ValueError, TypeError, FileNotFoundError, NotImplementedError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"{parser.prog}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted; the last checkpoint (if any) is intact: rerun with --resume",
              file=sys.stderr)
        return 130
    return 0
