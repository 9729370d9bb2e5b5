"""The training loop of `python -m fastssl.train`: config, optimisers, schedule, GradCache, checkpoints.

`train(Config(...))` runs one SSL training and returns its summary (also written to OUT/summary.json).
The pieces a researcher may want on their own are public: `LARS`, `warmup_cosine`, `ssl_backward`
(one forward + backward of the SSL objective, optionally in GradCache chunks), `ema_momentum` and
`ema_update` (the EMA teacher of MoCo and DINO), `save_atomic`.

One step: the criterion's `ViewPlan` (fastssl.train.losses) says which crops to draw and who embeds
them. The EMA teacher, if the plan has one, embeds its views under no_grad; the student embeds its own
(full-size views, then the small local crops of multi-crop, one forward per resolution) and the loss
gets both, plus the prototypes of a DINO head; after the optimizer step the teacher follows the student,
θt ← m·θt + (1 − m)·θs (MoCo: m constant; DINO: m on a cosine from --teacher-momentum to 1). The
teacher is not in the optimizer and never receives a gradient.

GradCache (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"),
`chunks = K`: (1) embed the batch in K chunks under no_grad; (2) run the loss and its backward on the
full-batch embeddings (a leaf tensor), which gives dL/dz; (3) re-run each chunk with autograd and call
z_chunk.backward(dL/dz_chunk), accumulating the parameter gradients. The chain rule makes the sum over
chunks equal the full-batch gradient whenever the encoder treats samples independently (GroupNorm,
LayerNorm, BatchNorm in eval mode); with BatchNorm in training mode each chunk uses its own statistics
(models.py explains). The random state is saved before each chunk's first pass and restored for its
second, so stochastic layers (dropout) draw the same masks; the augmented views are computed once for
the whole batch, before the chunks, so both passes see the same images. BatchNorm running statistics
are restored after the no-grad pass, so each chunk updates them once, as without chunks.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from fastssl.train import data as data_mod
from fastssl.train.augment import Augment
from fastssl.train.evaluate import (calibrate_batchnorm, extract_features, knn_accuracy, linear_probe_accuracy,
                                    representation_metrics)
from fastssl.train.losses import Criterion, build_criterion, head_prototypes
from fastssl.train.models import build_model

__all__ = ["Config", "TrainError", "LARS", "warmup_cosine", "ema_momentum", "ema_update", "ssl_backward",
           "save_atomic", "train", "resolve_device", "CHECKPOINT", "SUMMARY", "LOG"]

CHECKPOINT, SUMMARY, LOG = "checkpoint.pt", "summary.json", "log.jsonl"


class TrainError(ValueError):
    """A bad option or state that the CLI reports as one line."""


@dataclass
class Config:
    """Every option of the trainer; the CLI (fastssl.train.cli) documents each with its default."""

    # data
    dataset: str = "digits"
    data_dir: Optional[str] = None
    limit: Optional[int] = None
    copies: int = 1
    render_seed: int = 0
    clutter: float = 1.0
    # model
    model: str = "small-cnn"
    width: Optional[int] = None
    norm: Optional[str] = None
    proj_hidden: int = 512
    proj_dim: int = 128
    # loss
    loss: str = "simclr"
    backend: str = "auto"
    temperature: Optional[float] = None
    views: Optional[int] = None
    memory_bank: int = 1024
    moco_momentum: float = 0.99
    teacher_momentum: float = 0.99
    local_crops: Optional[int] = None
    local_size: int = 16
    local_scale: tuple = (0.3, 0.6)
    loss_options: dict = field(default_factory=dict)
    # optimisation
    epochs: int = 40
    batch_size: int = 128
    optimizer: str = "adamw"
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    warmup_epochs: float = 2.0
    chunks: int = 1
    precision: str = "auto"
    # augmentation
    crop_scale: tuple = (0.4, 1.0)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    jitter: float = 0.4
    hue: float = 0.5
    gray_p: float = 0.2
    blur_p: float = 0.0
    # evaluation
    knn_k: int = 20
    probe_wd: float = 5e-4
    eval_every: int = 1
    # run
    device: str = "auto"
    seed: int = 0
    threads: Optional[int] = None
    out: str = "runs/fastssl"
    resume: bool = False
    save_every: int = 1
    log_every: int = 10
    progress: bool = True

    #: options that may differ when resuming (they do not change what is computed)
    RUNTIME = ("device", "threads", "out", "resume", "progress", "save_every", "log_every")

    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        # AdamW: 3e-3 (measured on the default data, batch 128); LARS: SimCLR's 0.3 x B/256
        return 3e-3 if self.optimizer == "adamw" else 0.3 * self.batch_size / 256

    def resolved_wd(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return 1e-4 if self.optimizer == "adamw" else 1e-6

    def to_dict(self) -> dict:
        d = asdict(self)
        d["crop_scale"], d["local_scale"] = list(self.crop_scale), list(self.local_scale)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        for name in ("crop_scale", "local_scale"):
            if name in kw:
                kw[name] = tuple(kw[name])
        return cls(**kw)


# ---------------------------------------------------------------------------------------------------
# Optimisation
# ---------------------------------------------------------------------------------------------------

class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as SimCLR uses it: SGD with momentum whose step for each weight matrix is
    scaled by the trust ratio η‖w‖/‖g + wd·w‖. Parameters with ≤ 1 dimension (biases, norm scales) get
    neither weight decay nor adaptation, as in SimCLR.

        g ← ∇w + wd·w;  g ← g · η‖w‖/‖g‖ (if both norms > 0);  v ← μ v + g;  w ← w − lr·v
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 1e-3):
        if lr <= 0 or not 0 <= momentum < 1 or weight_decay < 0 or eta <= 0:
            raise ValueError(f"LARS needs lr > 0, 0 <= momentum < 1, weight_decay >= 0, eta > 0; got "
                             f"lr={lr}, momentum={momentum}, weight_decay={weight_decay}, eta={eta}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if p.ndim > 1:
                    g = g.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    trust = torch.where((w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm,
                                        torch.ones_like(w_norm))
                    g = g * trust
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(g).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(g)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warm-up (step+1)/warmup for step < warmup, then ½(1 + cos(π·t)), t in [0, 1]."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def ema_momentum(step: int, total: int, base: float, final: float = 1.0) -> float:
    """EMA momentum of step `step` (0-based) of `total`: final − (final − base)·(1 + cos(π·step/total))/2,
    DINO's cosine schedule, base at step 0 rising to final at `total`. base == final: a constant (MoCo)."""
    return final - (final - base) * 0.5 * (1.0 + math.cos(math.pi * step / max(1, total)))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """θt ← θt + (1 − m)·(θs − θt) = m·θt + (1 − m)·θs for every parameter (in place, on the teacher);
    buffers (BatchNorm running statistics) are copied from the student. Both nets have one architecture."""
    for pt, ps in zip(teacher.parameters(), student.parameters()):
        pt.lerp_(ps, 1.0 - momentum)
    for bt, bs in zip(teacher.buffers(), student.buffers()):
        bt.copy_(bs)


def _param_groups(modules: list[nn.Module], wd: float) -> list[dict]:
    decay, no_decay = [], []
    for m in modules:
        for p in m.parameters():
            if p.requires_grad:
                (decay if p.ndim > 1 else no_decay).append(p)
    return [dict(params=decay, weight_decay=wd), dict(params=no_decay, weight_decay=0.0)]


# ---------------------------------------------------------------------------------------------------
# One step of the SSL objective, optionally in GradCache chunks
# ---------------------------------------------------------------------------------------------------

def _rng_state(device: torch.device):
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _embed(model: nn.Module, x: Tensor, autocast: Callable) -> Tensor:
    """model on (m, n, 3, H, W) views -> (m, n, D), half precision promoted to fp32 (one call on m·n images)."""
    m, n = x.shape[:2]
    with autocast():
        z = model(x.flatten(0, 1))
    if z.dtype in (torch.float16, torch.bfloat16):  # autocast output: the loss gets fp32 (fp64 stays fp64)
        z = z.float()
    return z.view(m, n, -1)


def _embed_groups(model: nn.Module, groups: list[Tensor], sl: slice, autocast: Callable) -> Tensor:
    """Samples `sl` of every group of views, one forward per group: (Σ m_g, n, D), in group order."""
    zs = [_embed(model, g[:, sl], autocast) for g in groups]
    return zs[0] if len(zs) == 1 else torch.cat(zs)


def ssl_backward(model: nn.Module, views: Union[Tensor, Sequence[Tensor]], loss_fn: Callable[[list], Tensor],
                 chunks: int = 1, autocast: Callable = contextlib.nullcontext) -> Tensor:
    """Forward + backward of loss_fn([z_0, ..., z_{m-1}]), z_v = model(views[v]) (N, D); returns the loss.

    views: (m, N, 3, H, W), or a list of such groups with one N and a resolution each (multi-crop: the
    global views, then the local crops), each group embedded in one forward; z_v in group order.
    Gradients are accumulated into the parameters' .grad (call zero_grad before).
    chunks = K > 1 runs GradCache over K chunks of the N samples (each chunk holds all m views of its
    samples); the parameter gradients equal the unchunked ones for per-sample encoders (module docstring).
    """
    groups = [views] if isinstance(views, Tensor) else list(views)
    if not groups or any(g.dim() != 5 or g.shape[1] != groups[0].shape[1] for g in groups):
        raise ValueError(f"views must be (m, N, 3, H, W), or a list of them with one N, got "
                         f"{[tuple(g.shape) for g in groups]}")
    n = groups[0].shape[1]
    if not 1 <= chunks <= n:
        raise ValueError(f"chunks must be in [1, N = {n}], got {chunks}")
    if chunks == 1:
        z = _embed_groups(model, groups, slice(None), autocast)
        loss = loss_fn(list(z.unbind(0)))
        loss.backward()
        return loss.detach()
    device = groups[0].device
    slices = _chunk_slices(n, chunks)
    buffers = {k: b.clone() for k, b in model.named_buffers()}  # BN running stats: update once, in pass 2
    states, parts = [], []
    with torch.no_grad():
        for sl in slices:
            states.append(_rng_state(device))
            parts.append(_embed_groups(model, groups, sl, autocast))
    with torch.no_grad():
        for k, b in model.named_buffers():
            b.copy_(buffers[k])
    after = _rng_state(device)
    z = torch.cat(parts, dim=1).requires_grad_(True)          # (m, N, D) leaf: the cache
    loss = loss_fn(list(z.unbind(0)))
    loss.backward()
    grad = z.grad
    for sl, state in zip(slices, states):
        _set_rng_state(state, device)
        _embed_groups(model, groups, sl, autocast).backward(grad[:, sl])
    _set_rng_state(after, device)
    return loss.detach()


# ---------------------------------------------------------------------------------------------------
# Checkpoints and logs
# ---------------------------------------------------------------------------------------------------

def save_atomic(obj, path: Path) -> None:
    """torch.save to PATH.tmp in the same folder, fsync, then os.replace: PATH is always a whole file.

    A kill during the write leaves the previous PATH untouched (os.replace is atomic on POSIX and
    Windows when both names are on one file system, which the same folder guarantees).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        if isinstance(obj, (bytes, str)):
            f.write(obj.encode() if isinstance(obj, str) else obj)
        else:
            torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available, else cpu; otherwise the named device, checked to exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise TrainError(f"--device {name!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise TrainError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise TrainError(f"--device {name!r}: only cpu and cuda devices are supported")
    return dev


def _autocast_factory(cfg: Config, device: torch.device) -> Callable:
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    raise TrainError(f"--precision must be auto, fp32 or bf16, got {cfg.precision!r}")


class _Log:
    """Append-only JSON lines; the byte offset is checkpointed so a resumed run drops what it redoes."""

    def __init__(self, path: Path, offset: Optional[int]):
        self.path = path
        if offset is None:
            self.f = open(path, "w")
        else:
            self.f = open(path, "r+")
            self.f.truncate(offset)
            self.f.seek(offset)

    def write(self, record: dict) -> None:
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()

    def offset(self) -> int:
        return self.f.tell()

    def close(self) -> None:
        self.f.close()


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------

def _check_config(cfg: Config) -> None:
    def need(cond, msg):
        if not cond:
            raise TrainError(msg)

    need(cfg.epochs >= 1, f"--epochs must be >= 1, got {cfg.epochs}")
    need(cfg.batch_size >= 2, f"--batch-size must be >= 2, got {cfg.batch_size}")
    need(cfg.optimizer in ("adamw", "lars"), f"--optimizer must be adamw or lars, got {cfg.optimizer!r}")
    need(cfg.lr is None or cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}")
    need(cfg.weight_decay is None or cfg.weight_decay >= 0, f"--weight-decay must be >= 0, got {cfg.weight_decay}")
    need(cfg.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {cfg.warmup_epochs}")
    need(cfg.chunks >= 1, f"--chunks must be >= 1, got {cfg.chunks}")
    need(cfg.copies >= 1, f"--copies must be >= 1, got {cfg.copies}")
    need(cfg.limit is None or cfg.limit >= 2, f"--limit must be >= 2, got {cfg.limit}")
    need(0 <= cfg.moco_momentum < 1, f"--moco-momentum must be in [0, 1), got {cfg.moco_momentum}")
    need(0 <= cfg.teacher_momentum <= 1, f"--teacher-momentum must be in [0, 1], got {cfg.teacher_momentum}")
    need(cfg.local_size >= 1, f"--local-size must be >= 1, got {cfg.local_size}")
    need(len(cfg.local_scale) == 2 and 0 < cfg.local_scale[0] <= cfg.local_scale[1] <= 1,
         f"--local-scale must be MIN,MAX with 0 < MIN <= MAX <= 1, got {cfg.local_scale}")
    need(cfg.knn_k >= 1, f"--knn-k must be >= 1, got {cfg.knn_k}")
    need(cfg.eval_every >= 0 and cfg.save_every >= 0 and cfg.log_every >= 1,
         "--eval-every and --save-every must be >= 0, --log-every >= 1")
    need(cfg.threads is None or cfg.threads >= 1, f"--threads must be >= 1, got {cfg.threads}")


def _check_resumable(cfg: Config, saved: Config, epochs_done: int, out: Path) -> None:
    """--resume continues the same run: every option that changes what is computed must match, except
    --epochs, which may grow (or shrink to no fewer than the epochs already trained): train() re-plans
    the learning-rate schedule for the new total."""
    now, before = cfg.to_dict(), saved.to_dict()
    diff = [k for k in before if k not in Config.RUNTIME and k != "epochs" and before[k] != now[k]]
    if diff:
        raise TrainError(f"--resume: {', '.join('--' + k.replace('_', '-') for k in diff)} differ(s) from the run "
                         f"in {out} (resume continues the same run; its options are in {out / SUMMARY} or the checkpoint)")
    if cfg.epochs < epochs_done:
        raise TrainError(f"--resume: the run in {out} has already trained {_plural(epochs_done, 'epoch')}; "
                         f"--epochs must be >= {epochs_done} to continue it, got {cfg.epochs}")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _print(msg: str, progress: bool) -> None:
    if progress:
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stdout)
    else:
        print(msg, flush=True)


def train(cfg: Config) -> dict:
    """Run (or resume) the SSL training described by `cfg`; returns the summary dict."""
    t_start = time.perf_counter()
    _check_config(cfg)
    out = Path(cfg.out)
    ckpt_path = out / CHECKPOINT
    ckpt = None
    if cfg.resume:
        if not ckpt_path.is_file():
            raise TrainError(f"--resume: no checkpoint {ckpt_path} to continue (run once without --resume)")
        try:
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        except Exception as e:  # a foreign or damaged file: one line, not a traceback
            raise TrainError(f"--resume: cannot read {ckpt_path} ({type(e).__name__}: {e})") from None
        _check_resumable(cfg, Config.from_dict(ckpt["config"]), ckpt["epoch"], out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainError(f"--out {out}: cannot create the folder ({e.strerror})") from None

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    autocast = _autocast_factory(cfg, device)
    torch.manual_seed(cfg.seed)

    ds = data_mod.load_dataset(cfg.dataset, cfg.data_dir, render_seed=cfg.render_seed, copies=cfg.copies,
                               clutter=cfg.clutter, limit=cfg.limit)
    train_x, train_y = ds.train_x.to(device), ds.train_y.to(device)
    test_x, test_y = ds.test_x.to(device), ds.test_y.to(device)
    n_train = train_x.shape[0]
    batch = min(cfg.batch_size, n_train)
    steps_per_epoch = n_train // batch
    total_steps = steps_per_epoch * cfg.epochs
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))

    lo, hi = cfg.crop_scale
    aug = Augment(size=ds.image_size, crop_scale=(lo, hi), flip_p=cfg.flip_p, jitter_p=cfg.jitter_p,
                  brightness=cfg.jitter, contrast=cfg.jitter, saturation=cfg.jitter, hue=cfg.hue, gray_p=cfg.gray_p,
                  blur_p=cfg.blur_p, mean=ds.mean, std=ds.std)

    # The model first: its initial encoder (the random-init baseline) is then the same for every loss, and
    # a loss that draws its initial state (MoCo's bank) draws it after.
    model = build_model(cfg.model, width=cfg.width, norm=cfg.norm, proj_hidden=cfg.proj_hidden, proj_dim=cfg.proj_dim,
                        prototypes=head_prototypes(cfg.loss, cfg.loss_options)).to(device)
    init_encoder = copy.deepcopy(model.encoder.state_dict())
    crit: Criterion = build_criterion(cfg.loss, cfg.proj_dim, backend=cfg.backend, temperature=cfg.temperature,
                                      views=cfg.views, memory_bank=cfg.memory_bank, local_crops=cfg.local_crops,
                                      options=cfg.loss_options)
    crit.module.to(device)
    plan = crit.views
    # DINO's local crops: a part of the image at a smaller size (multi-crop), the same colour augmentations
    local_aug = replace(aug, size=cfg.local_size, crop_scale=cfg.local_scale) if plan.local_views else None
    teacher = None  # the EMA of the student (MoCo's key encoder, DINO's teacher): no gradient, not optimised
    if plan.has_teacher:
        teacher = copy.deepcopy(model)
        teacher.requires_grad_(False)
    lr, wd = cfg.resolved_lr(), cfg.resolved_wd()
    groups = _param_groups([model, crit.module], wd)
    opt = (torch.optim.AdamW(groups, lr=lr) if cfg.optimizer == "adamw" else LARS(groups, lr=lr))
    data_gen = torch.Generator().manual_seed(cfg.seed)
    aug_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)

    start_epoch, step, history, elapsed_before = 0, 0, [], 0.0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        init_encoder = ckpt["init_encoder"]
        opt.load_state_dict(ckpt["optimizer"])
        crit.module.load_state_dict(ckpt["criterion"])
        with torch.no_grad():
            for k, b in crit.module.named_buffers():  # non-persistent buffers too (the MoCo bank)
                b.copy_(ckpt["criterion_buffers"][k])
        if teacher is not None:
            teacher.load_state_dict(ckpt["ema"])
        data_gen.set_state(ckpt["data_gen"])
        aug_gen.set_state(ckpt["aug_gen"].to(aug_gen.get_state().device))
        torch.set_rng_state(ckpt["torch_rng"])
        start_epoch, step, history = ckpt["epoch"], ckpt["step"], ckpt["history"]
        elapsed_before = ckpt["seconds"]
    # The schedule is a function of the step, planned for this run's --epochs: built after the
    # checkpoint is loaded, at its step, so a resume with more epochs stretches the cosine to the new
    # total (the saved scheduler state is kept in the checkpoint for inspection only).
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, total_steps, warmup),
                                              last_epoch=step - 1)
    log = _Log(out / LOG, ckpt["log_offset"] if ckpt is not None else None)

    def momentum_at(step: int) -> float:
        if cfg.loss == "moco":
            return cfg.moco_momentum
        return ema_momentum(step, total_steps, cfg.teacher_momentum)  # planned, like the LR, for this --epochs

    def save(epoch: int, seconds: float) -> None:
        state = {
            "config": cfg.to_dict(), "epoch": epoch, "step": step, "history": history, "seconds": seconds,
            "model": model.state_dict(), "init_encoder": init_encoder, "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "criterion": crit.module.state_dict(),
            "criterion_buffers": {k: b.detach().cpu() for k, b in crit.module.named_buffers()},
            "ema": teacher.state_dict() if teacher is not None else None,
            "data_gen": data_gen.get_state(), "aug_gen": aug_gen.get_state().cpu(), "torch_rng": torch.get_rng_state(),
            "log_offset": log.offset(),
        }
        save_atomic(state, ckpt_path)

    def evaluate(encoder: nn.Module) -> dict:
        f_tr = extract_features(encoder, train_x, aug.plain, device, autocast=autocast)
        f_te = extract_features(encoder, test_x, aug.plain, device, autocast=autocast)
        rec = {"knn_acc": knn_accuracy(f_tr, train_y, f_te, test_y, k=cfg.knn_k, num_classes=ds.num_classes)}
        rec.update(representation_metrics(encoder, test_x, test_y, aug, device, seed=cfg.seed + 2, autocast=autocast))
        return rec

    if ckpt is not None:
        planned = ckpt["config"]["epochs"]
        msg = f"fastssl.train: resuming {out} after epoch {start_epoch}/{planned} (step {step})"
        if planned != cfg.epochs:
            was = lr * warmup_cosine(step, steps_per_epoch * planned, warmup)
            msg += (f"; --epochs {planned} -> {cfg.epochs}: the learning-rate schedule (warm-up "
                    f"{_plural(warmup, 'step')} + cosine) is re-planned for {total_steps} steps, lr now "
                    f"{sched.get_last_lr()[0]:.3g} (was {was:.3g})")
        _print(msg, cfg.progress)
    else:
        _print(f"fastssl.train: {cfg.loss} on {ds.name} ({n_train} train / {test_x.shape[0]} test images, "
               f"{ds.image_size}x{ds.image_size}), {cfg.model}, {_plural(cfg.epochs, 'epoch')} x "
               f"{_plural(steps_per_epoch, 'step')} of {batch}, {cfg.optimizer} lr {lr:g}, device {device}, "
               f"out {out}", cfg.progress)
        if cfg.eval_every:
            rec = {"type": "epoch", "epoch": 0, "step": 0, **evaluate(model.encoder)}
            history.append(rec)
            log.write(rec)

    from tqdm import tqdm

    t_run = time.perf_counter()
    last_loss = float("nan")
    head = _prototype_args(model, teacher)  # DINO: the student's and the teacher's prototypes, for the loss
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        t_epoch = time.perf_counter()
        perm = torch.randperm(n_train, generator=data_gen).to(device)
        losses = []
        # disable=None: tqdm turns itself off when stderr is not a terminal (CI logs, pipes), where
        # every redraw would become a line; the per-epoch summary lines still print.
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=None if cfg.progress else True,
                   leave=False, dynamic_ncols=True, file=sys.stderr)
        for i in range(steps_per_epoch):
            t0 = time.perf_counter()
            x = train_x[perm[i * batch:(i + 1) * batch]]
            with torch.no_grad():
                global_views = aug.views(x, plan.global_views, aug_gen)
                student_views = [global_views[plan.student]]
                if local_aug is not None:
                    student_views.append(local_aug.views(x, plan.local_views, aug_gen))
            teacher_zs = None
            if teacher is not None:
                with torch.no_grad():
                    teacher_zs = torch.cat([_embed(teacher, global_views[plan.teacher, sl], autocast)
                                            for sl in _chunk_slices(batch, cfg.chunks)], dim=1)

            def loss_fn(zs: list) -> Tensor:
                return crit(zs, teacher_zs, **head, epoch=epoch)

            opt.zero_grad(set_to_none=True)
            loss = ssl_backward(model, student_views, loss_fn, cfg.chunks, autocast)
            opt.step()
            sched.step()
            if teacher is not None:
                ema_update(teacher, model, momentum_at(step))
            step += 1
            loss_v = loss.item()
            if not math.isfinite(loss_v):
                raise TrainError(f"the loss became {loss_v} at step {step} (epoch {epoch + 1}); lower --lr or "
                                 f"check --temperature")
            losses.append(loss_v)
            ips = batch / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{loss_v:.4f}", img_s=f"{ips:.0f}")
            bar.update(1)
            if step % cfg.log_every == 0 or i == steps_per_epoch - 1:
                log.write({"type": "step", "epoch": epoch + 1, "step": step, "loss": loss_v,
                           "lr": sched.get_last_lr()[0], "images_per_s": ips})
        bar.close()
        last_loss = sum(losses) / len(losses)
        train_s = time.perf_counter() - t_epoch
        rec = {"type": "epoch", "epoch": epoch + 1, "step": step, "loss": last_loss,
               "images_per_s": steps_per_epoch * batch / train_s, "train_seconds": train_s}
        if cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            rec.update(evaluate(model.encoder))
        history.append(rec)
        log.write(rec)
        msg = f"epoch {epoch + 1}/{cfg.epochs}  loss {last_loss:.4f}  {rec['images_per_s']:.0f} img/s"
        if "knn_acc" in rec:
            msg += f"  knn {rec['knn_acc']:.3f}  align {rec['alignment']:.3f}  unif {rec['uniformity']:.3f}"
        _print(msg, cfg.progress)
        if cfg.save_every and ((epoch + 1) % cfg.save_every == 0 or epoch + 1 == cfg.epochs):
            save(epoch + 1, elapsed_before + time.perf_counter() - t_start)
    train_seconds = time.perf_counter() - t_run

    # final evaluation: SSL encoder vs the same architecture at its random initialisation
    f_tr = extract_features(model.encoder, train_x, aug.plain, device, autocast=autocast)
    f_te = extract_features(model.encoder, test_x, aug.plain, device, autocast=autocast)
    baseline = build_model(cfg.model, width=cfg.width, norm=cfg.norm, proj_hidden=cfg.proj_hidden,
                           proj_dim=cfg.proj_dim).encoder.to(device)
    baseline.load_state_dict(init_encoder)
    calibrate_batchnorm(baseline, train_x, aug.plain, device)
    b_tr = extract_features(baseline, train_x, aug.plain, device, autocast=autocast)
    b_te = extract_features(baseline, test_x, aug.plain, device, autocast=autocast)
    probe = dict(weight_decay=cfg.probe_wd, num_classes=ds.num_classes)
    final_metrics = representation_metrics(model.encoder, test_x, test_y, aug, device, seed=cfg.seed + 2,
                                           autocast=autocast)
    base_metrics = representation_metrics(baseline, test_x, test_y, aug, device, seed=cfg.seed + 2, autocast=autocast)
    if last_loss != last_loss and history:  # resumed after the last epoch: take the logged value
        last_loss = next((h["loss"] for h in reversed(history) if "loss" in h), float("nan"))
    summary = {
        "linear_probe_acc": linear_probe_accuracy(f_tr, train_y, f_te, test_y, **probe),
        "knn_acc": knn_accuracy(f_tr, train_y, f_te, test_y, k=cfg.knn_k, num_classes=ds.num_classes),
        "baseline_linear_probe_acc": linear_probe_accuracy(b_tr, train_y, b_te, test_y, **probe),
        "baseline_knn_acc": knn_accuracy(b_tr, train_y, b_te, test_y, k=cfg.knn_k, num_classes=ds.num_classes),
        **final_metrics,
        **{f"baseline_{k}": v for k, v in base_metrics.items()},
        "loss": last_loss,
        "seconds": elapsed_before + time.perf_counter() - t_start,
        "train_seconds": train_seconds,
        "epochs": cfg.epochs,
        "steps": step,
        "images_per_s": (sum(h.get("images_per_s", 0.0) * h.get("train_seconds", 0.0) for h in history)
                         / max(1e-9, sum(h.get("train_seconds", 0.0) for h in history))),
        "dataset": {"name": ds.name, "train": n_train, "test": int(test_x.shape[0]), "classes": ds.num_classes,
                    "image_size": ds.image_size},
        "device": str(device),
        "torch": torch.__version__,
        "config": cfg.to_dict(),
    }
    log.write({"type": "summary", **{k: v for k, v in summary.items() if k != "config"}})
    log.close()
    save_atomic(json.dumps(summary, indent=2) + "\n", out / SUMMARY)
    print(report(summary), flush=True)
    return summary


def _prototype_args(model: nn.Module, teacher: Optional[nn.Module]) -> dict:
    """The loss's prototypes of a prototype head (DINO): the student's (optimised) and the teacher's (EMA)."""
    prototypes = getattr(model.projector, "prototypes", None)
    if prototypes is None:
        return {}
    return {"prototypes": prototypes, "teacher_prototypes": teacher.projector.prototypes}


def _chunk_slices(n: int, chunks: int) -> list[slice]:
    bounds = [round(i * n / chunks) for i in range(chunks + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(chunks)]


def report(s: dict) -> str:
    """The human-readable end-of-run report."""
    c = s["config"]
    gain = 100 * (s["linear_probe_acc"] - s["baseline_linear_probe_acc"])
    buf = io.StringIO()
    w = buf.write
    w(f"\n== fastssl.train: {c['loss']} on {s['dataset']['name']} ({c['model']}, {_plural(s['epochs'], 'epoch')}, "
      f"{s['seconds']:.0f} s on {s['device']}) ==\n")
    w(f"{'':28s}{'SSL encoder':>14s}{'random init':>14s}\n")
    w(f"{'linear probe accuracy':28s}{s['linear_probe_acc']:14.3f}{s['baseline_linear_probe_acc']:14.3f}\n")
    w(f"{'k-NN accuracy (k=' + str(c['knn_k']) + ')':28s}{s['knn_acc']:14.3f}{s['baseline_knn_acc']:14.3f}\n")
    w(f"{'alignment (lower better)':28s}{s['alignment']:14.3f}{s['baseline_alignment']:14.3f}\n")
    w(f"{'uniformity (lower better)':28s}{s['uniformity']:14.3f}{s['baseline_uniformity']:14.3f}\n")
    w(f"{'class-centre divergence':28s}{s['divergence']:14.3f}{s['baseline_divergence']:14.3f}\n")
    w(f"final loss {s['loss']:.4f}; {s['images_per_s']:.0f} train images/s; "
      f"self-supervision adds {gain:+.1f} points of linear-probe accuracy.\n")
    w(f"summary: {Path(c['out']) / SUMMARY}   curves: python -m fastssl.train.plot {c['out']}\n")
    return buf.getvalue()
