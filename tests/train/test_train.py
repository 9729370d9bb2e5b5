"""The trainer end to end on tiny settings: every --loss, summary/log files, resume, atomic checkpoints, CLI.

Tiny means a 64-image subset of the embedded digits, a width-4 CNN and one or two epochs: these tests
check the plumbing and the contracts; the learning itself is measured in docs/trainer.md.
"""

import json
import subprocess
import sys

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from fastssl.train import engine
from fastssl.train.cli import build_parser, main
from fastssl.train.engine import Config, TrainError, save_atomic, train
from fastssl.train.losses import LOSSES

TINY = dict(limit=64, batch_size=32, width=4, proj_hidden=16, proj_dim=16, memory_bank=64, knn_k=5,
            progress=False, device="cpu")

SUMMARY_KEYS = {"linear_probe_acc", "knn_acc", "baseline_linear_probe_acc", "baseline_knn_acc", "alignment",
                "uniformity", "loss", "seconds", "config"}


@pytest.mark.parametrize("loss", list(LOSSES))
def test_every_loss_trains_one_epoch(tmp_path, loss, capsys):
    extra = {"views": 3} if loss == "arcl" else {}
    s = train(Config(loss=loss, epochs=1, out=str(tmp_path), eval_every=0, **TINY, **extra))
    assert SUMMARY_KEYS <= s.keys()
    assert s["steps"] == 2 and torch.isfinite(torch.tensor(s["loss"]))
    for k in ("linear_probe_acc", "knn_acc", "baseline_linear_probe_acc", "baseline_knn_acc"):
        assert 0.0 <= s[k] <= 1.0
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["config"]["loss"] == loss and on_disk["loss"] == pytest.approx(s["loss"])
    assert "linear probe accuracy" in capsys.readouterr().out


def test_log_records_and_plot(tmp_path):
    train(Config(epochs=2, out=str(tmp_path), log_every=1, **TINY))
    recs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["type"] == "step"]
    epochs = [r for r in recs if r["type"] == "epoch"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(r["images_per_s"] > 0 and r["lr"] > 0 for r in steps)
    assert [r["epoch"] for r in epochs] == [0, 1, 2]  # epoch 0: the random initialisation
    for r in epochs:
        assert {"knn_acc", "alignment", "uniformity", "divergence"} <= r.keys()
    assert recs[-1]["type"] == "summary"
    pytest.importorskip("matplotlib", reason="fastssl.train.plot needs matplotlib (the plot extra)")
    from fastssl.train.plot import main as plot_main

    assert plot_main([str(tmp_path)]) == 0
    png = tmp_path / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_main([str(tmp_path / "missing")]) == 2


def _ckpt_model(path):
    return torch.load(path / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]


def test_resume_continues_the_same_run(tmp_path, monkeypatch):
    cfg = dict(epochs=3, loss="moco", **TINY)  # moco: the bank and the EMA encoder must be restored too
    straight = train(Config(out=str(tmp_path / "a"), **cfg))

    calls = {"n": 0}
    real = engine.save_atomic

    def crash_on_second_checkpoint(obj, path):
        if str(path).endswith("checkpoint.pt"):
            calls["n"] += 1
            if calls["n"] == 2:  # killed in the middle of writing epoch 2's checkpoint
                (path.parent / (path.name + ".tmp")).write_bytes(b"partial")
                raise KeyboardInterrupt
        return real(obj, path)

    monkeypatch.setattr(engine, "save_atomic", crash_on_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train(Config(out=str(tmp_path / "b"), **cfg))
    monkeypatch.setattr(engine, "save_atomic", real)
    ck = torch.load(tmp_path / "b" / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert ck["epoch"] == 1  # the last good checkpoint survived the interrupted save
    resumed = train(Config(out=str(tmp_path / "b"), resume=True, **cfg))

    a, b = _ckpt_model(tmp_path / "a"), _ckpt_model(tmp_path / "b")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    assert resumed["loss"] == straight["loss"] and resumed["linear_probe_acc"] == straight["linear_probe_acc"]
    log_a = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [(r["type"], r.get("step"), r.get("loss")) for r in log_b] == [(r["type"], r.get("step"), r.get("loss")) for r in log_a]


def test_resume_refuses_other_options_and_missing_checkpoint(tmp_path):
    with pytest.raises(TrainError, match="no checkpoint"):
        train(Config(out=str(tmp_path), resume=True, **TINY))
    train(Config(epochs=1, out=str(tmp_path), eval_every=0, **TINY))
    with pytest.raises(TrainError, match="--lr"):
        train(Config(epochs=1, out=str(tmp_path), resume=True, lr=0.5, **TINY))


def test_resume_a_finished_run_to_more_epochs(tmp_path, capsys):
    cfg = dict(out=str(tmp_path), warmup_epochs=0.5, eval_every=0, log_every=1, **TINY)  # 2 steps/epoch, warm-up 1
    train(Config(epochs=1, **cfg))
    out = capsys.readouterr().out
    assert "1 epoch x 2 steps of 32" in out and "(small-cnn, 1 epoch," in out  # singular, not "1 epochs"
    first_log = (tmp_path / "log.jsonl").read_text().splitlines()

    used = []  # the learning rate each step of the trainer's AdamW actually applies (the probe uses LBFGS)
    hook = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]) if type(opt) is torch.optim.AdamW else None)
    try:
        s = train(Config(epochs=3, resume=True, **cfg))
    finally:
        hook.remove()

    # the schedule is re-planned for 3 x 2 = 6 steps and picks up at the saved step 2 (the old plan ended at lr 0)
    lr = Config().resolved_lr()
    assert used == pytest.approx([lr * engine.warmup_cosine(k, 6, 1) for k in range(2, 6)], rel=1e-12)
    assert all(u > 0 for u in used)
    out = capsys.readouterr().out
    assert "resuming" in out and "--epochs 1 -> 3" in out and "re-planned for 6 steps" in out
    assert "(small-cnn, 3 epochs," in out
    assert s["epochs"] == 3 and s["steps"] == 6
    assert json.loads((tmp_path / "summary.json").read_text())["epochs"] == 3
    ck = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert ck["epoch"] == 3 and ck["step"] == 6 and ck["config"]["epochs"] == 3

    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert lines[:len(first_log) - 1] == first_log[:-1]  # the first run's records, minus its summary
    recs = [json.loads(x) for x in lines]
    assert [r["step"] for r in recs if r["type"] == "step"] == [1, 2, 3, 4, 5, 6]
    assert [r["epoch"] for r in recs if r["type"] == "epoch"] == [1, 2, 3]
    assert [r["type"] for r in recs].count("summary") == 1 and recs[-1]["type"] == "summary"
    # each step record logs the lr of the next step: the old plan up to step 2, the new one after
    logged = [r["lr"] for r in recs if r["type"] == "step"]
    assert logged[2:] == pytest.approx([lr * engine.warmup_cosine(k, 6, 1) for k in range(3, 7)], rel=1e-12, abs=1e-15)

    with pytest.raises(TrainError, match="already trained 3 epochs; --epochs must be >= 3 to continue it, got 2"):
        train(Config(epochs=2, resume=True, **cfg))


def test_save_atomic_keeps_the_old_file_when_a_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_atomic({"epoch": 1}, path)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_atomic({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {"epoch": 1}


def test_gradcache_run_and_lars(tmp_path):
    s = train(Config(epochs=1, chunks=2, optimizer="lars", norm="gn", out=str(tmp_path), eval_every=0, **TINY))
    assert s["config"]["chunks"] == 2 and s["steps"] == 2


def test_help_documents_every_option():
    text = build_parser().format_help()
    for f in engine.fields(Config):
        flag = "--" + {"loss_options": "loss-option", "progress": "no-progress"}.get(f.name, f.name.replace("_", "-"))
        assert flag in text, flag
    assert text.count("default") >= 35


@pytest.mark.parametrize("argv,match", [
    (["--dataset", "cifar10", "--data-dir", "/nonexistent/cifar"], "cifar-10-batches-py"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
    (["--temperature", "0.2", "--loss", "barlow", "--limit", "40"], "temperature"),
    (["--views", "3", "--loss", "simclr", "--limit", "40"], "only for --loss arcl"),
    (["--loss-option", "nonsense=1", "--limit", "40"], "not an argument of fastssl.nn.NTXentLoss"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, argv, match):
    assert main(argv + ["--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_bad_option_subprocess(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fastssl.train", "--loss", "simsiam"], capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([sys.executable, "-m", "fastssl.train", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--chunks" in r.stdout


def test_throughput_tool_cpu(tmp_path):
    from fastssl.train.throughput import main as tp_main

    path = tmp_path / "tp.json"
    assert tp_main(["--device", "cpu", "--steps", "2", "--warmup", "0", "--batch", "16", "--model", "small-cnn",
                    "--losses", "simclr", "--json", str(path)]) == 0
    rep = json.loads(path.read_text())
    by = {r["backend"]: r for r in rep["results"]}
    assert set(by) == {"auto", "reference"} and all(r["images_per_s"] > 0 for r in by.values())
    assert rep["device"] == "cpu" and rep["batch"] == 16
    # same seed, same views, same initial weights: both backends compute the same loss
    assert by["auto"]["final_loss"] == pytest.approx(by["reference"]["final_loss"], rel=1e-4)
