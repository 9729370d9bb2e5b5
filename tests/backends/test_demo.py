"""The main job's demo (`python -m fastssl.demo`) runs every loss and agrees with the spec."""

from fastssl import demo


def test_demo_runs_and_every_loss_matches(capsys):
    assert demo.main(["--n", "48", "--dim", "20", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for name in demo.LOSSES:
        assert f"\n{name} " in out, f"{name} missing from the demo's table:\n{out}"
    assert "MISMATCH" not in out and "Every loss matches" in out


def test_demo_flags_a_wrong_loss(monkeypatch, capsys):
    """The check is real: a loss that is off by 1e-3 relative is reported and fails the run."""
    ours, spec = demo.LOSSES["nt_xent"]
    monkeypatch.setitem(demo.LOSSES, "nt_xent", (lambda *a: ours(*a) * (1 + 1e-3), spec))
    assert demo.main(["--n", "16", "--dim", "8", "--device", "cpu"]) == 1
    assert "MISMATCH" in capsys.readouterr().out
