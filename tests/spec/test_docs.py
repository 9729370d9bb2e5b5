"""The documentation against the code: examples run, cited sections exist, figures regenerate, no outside refs.

* Every ```python block of README.md and docs/*.md runs as written, each in a fresh interpreter (so a
  block that sets up torch.distributed cannot leak into another), with the environment torchrun gives
  a one-process job. A failure names the file and the line of the block. A block that cannot run here
  is marked with `<!-- not-run: REASON -->` on the line before it; it is skipped with that reason.
* Every section of docs/design.md that the code cites ("The losses (the spec)", family N, layer N)
  exists under that name.
* docs/refresh_figures.py rewrites the marked figure sections from a summary.json: checked on a
  synthetic summary, and every marked section in the docs has a renderer.
* No tracked file refers to a document outside the repository (the design notes, house style and
  papers the project was started from, its issue tracker, a machine's paths).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
DESIGN = REPO / "docs" / "design.md"

_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
_NOT_RUN = re.compile(r"<!--\s*not-run:\s*(.+?)\s*-->\s*$")


def _blocks_of(text: str) -> list[tuple[int, str, str | None]]:
    """(first code line, code, not-run reason or None) of every ```python block of a Markdown text."""
    blocks = []
    for match in _FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 2  # the line after the fence
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        reason = _NOT_RUN.search(before)
        blocks.append((line, match.group(1), reason and reason.group(1)))
    return blocks


def _python_blocks():
    """(file, first code line, code, not-run reason or None) of every ```python block in the docs."""
    return [(path.relative_to(REPO).as_posix(), *block) for path in DOCS for block in _blocks_of(path.read_text())]


BLOCKS = _python_blocks()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Runs one block from stdin, compiled under its file name with its lines at their place in the file,
# so a traceback points at the documentation line.
_RUNNER = """
import sys
name, line = sys.argv[1], int(sys.argv[2])
code = "\\n" * (line - 1) + sys.stdin.read()
exec(compile(code, name, "exec"), {"__name__": "__main__"})
"""


def test_the_docs_have_python_examples():
    """The collection below is not silently empty (a changed fence style would skip every example)."""
    assert {file for file, *_ in BLOCKS} >= {"README.md", "docs/distributed.md"}


def test_block_extraction_and_not_run_marker():
    text = ("intro\n```python\nx = 1\n```\n\n<!-- not-run: needs a dataset download -->\n```python\ny = 2\n```\n"
            "```sh\nls\n```\n")  # fmt: skip
    assert _blocks_of(text) == [(3, "x = 1\n", None), (8, "y = 2\n", "needs a dataset download")]


@pytest.mark.parametrize("file, line, code, reason", BLOCKS, ids=[f"{f}:{n}" for f, n, _, _ in BLOCKS])
def test_python_block_runs(file, line, code, reason):
    if reason:
        pytest.skip(f"{file}:{line} is marked not-run: {reason}")
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))  # fmt: skip
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", _RUNNER, file, str(line)], input=code, cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, f"the python block at {file}:{line} fails:\n{run.stderr[-3000:]}"


# --------------------------------------------------------------------------------------------------
# docs/design.md: the sections the code cites


def _headings() -> list[str]:
    return [m.group(1).strip() for m in re.finditer(r"^#{2,6} (.+)$", DESIGN.read_text(), re.M)]


def _tracked_files() -> list[Path]:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout to list the tracked files (git ls-files)")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [REPO / name for name in out.split("\0") if name]


def _text(path: Path):
    try:
        return path.read_text()
    except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
        return None  # binary data, or deleted in the work tree


def _citations():
    """(file:line, the line) of every line of a tracked file that names docs/design.md."""
    for path in _tracked_files():
        text = _text(path)
        if text is None or "docs/design.md" not in text:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if "docs/design.md" in line:
                yield f"{path.relative_to(REPO)}:{number}", line


def test_design_lists_its_sections_at_the_top():
    text = DESIGN.read_text()
    contents = text[: text.index("\n## ")]
    missing = [h for h in _headings() if f"[{h}]" not in contents]
    assert not missing, f"docs/design.md's list of sections at the top lacks {missing}"


def test_every_cited_section_name_exists():
    """A section name quoted right after the path of the design document, in any tracked file, is a
    heading of it (or the start of one: "The losses" names "The losses (the spec)")."""
    headings = _headings()
    cited = re.compile(r'docs/design\.md[,:]?\s*\(?\\?"([^"\\]+)\\?"')
    missing = [
        f"{where}: {name!r}"
        for where, line in _citations()
        for name in cited.findall(line)
        if not any(h == name or h.startswith(name + " ") for h in headings)
    ]
    assert not missing, f"sections cited but not in docs/design.md (headings: {headings}):\n" + "\n".join(missing)


def test_every_cited_family_and_layer_exists():
    """'family N' has a heading 'Family N: ...'; 'layer N' / 'check N' is item N of 'Correctness without a GPU'."""
    text = DESIGN.read_text()
    families = {int(m) for m in re.findall(r"^## Family (\d+): ", text, re.M)}
    section = text.split("\n## Correctness without a GPU\n", 1)[1].split("\n## ", 1)[0]
    layers = {int(m) for m in re.findall(r"^\d+\. \*\*Layer (\d+): ", section, re.M)}
    # Numbered 1..n without gaps, and the ones the code has always cited are there.
    assert families == set(range(1, len(families) + 1)) and families >= {1, 2, 3}, families
    assert layers == set(range(1, len(layers) + 1)) and layers >= {1, 2, 3, 4, 5}, layers
    missing = []
    for where, line in _citations():
        missing += [f"{where}: family {n}" for n in re.findall(r"family (\d+)", line) if int(n) not in families]
        missing += [f"{where}: layer {n}" for n in re.findall(r"(?:layer|check) (\d+)", line) if int(n) not in layers]
    assert not missing, "cited but not in docs/design.md:\n" + "\n".join(missing)


# --------------------------------------------------------------------------------------------------
# docs/refresh_figures.py


def _refresh_module():
    spec = importlib.util.spec_from_file_location("refresh_figures", REPO / "docs" / "refresh_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SUMMARY = {
    "linear_probe_acc": 0.61234, "baseline_linear_probe_acc": 0.2, "knn_acc": 0.5, "baseline_knn_acc": 0.125,
    "alignment": 0.25, "baseline_alignment": 0.5, "uniformity": -0.4, "baseline_uniformity": -0.8,
    "divergence": 0.9, "baseline_divergence": 0.75, "loss": 4.56789, "seconds": 61.6, "train_seconds": 57.2,
    "images_per_s": 1500.4, "steps": 400, "device": "cpu", "torch": "9.9.9",
}  # fmt: skip


def test_refresh_rewrites_only_the_marked_sections():
    refresh = _refresh_module()
    text = ("# Title\nbefore 0.709\n<!-- figures:readme-default-run -->\nold 0.709 vs 0.178\n"
            "<!-- /figures:readme-default-run -->\nafter 0.709\n")  # fmt: skip
    new = refresh.rewrite(text, SUMMARY, "2031-01-02", "a test machine")
    head, rest = new.split("<!-- figures:readme-default-run -->\n")
    body, tail = rest.split("<!-- /figures:readme-default-run -->")
    assert head == "# Title\nbefore 0.709\n" and tail == "\nafter 0.709\n"
    assert "old" not in body
    for figure in ("0.612 vs 0.200", "+41.2 points", "0.500 vs 0.125", "62 s", "2031-01-02", "a test machine"):
        assert figure in body, (figure, body)
    assert refresh.rewrite(new, SUMMARY, "2031-01-02", "a test machine") == new  # idempotent


def test_refresh_trainer_table():
    refresh = _refresh_module()
    text = "<!-- figures:trainer-default-run -->\n<!-- /figures:trainer-default-run -->\n"
    new = refresh.rewrite(text, SUMMARY, "2031-01-02", "a test machine")
    assert "| uniformity (lower is more uniform) | -0.400 | -0.800 |" in new
    assert "| linear probe accuracy | 0.612 | 0.200 |" in new
    assert "final loss 4.5679" in new and "+41.2 points" in new and "torch 9.9.9" in new


def test_refresh_rejects_unknown_or_unclosed_sections():
    refresh = _refresh_module()
    with pytest.raises(ValueError, match="unknown figures section"):
        refresh.rewrite("<!-- figures:nope -->\n<!-- /figures:nope -->\n", SUMMARY, "d", "m")
    with pytest.raises(ValueError, match="no end marker"):
        refresh.rewrite("<!-- figures:readme-default-run -->\ntext\n", SUMMARY, "d", "m")


def test_refresh_refuses_a_non_default_run():
    pytest.importorskip("fastssl.train")
    refresh = _refresh_module()
    from fastssl.train import Config

    config = Config().to_dict()
    refresh.check_default_run({"config": dict(config, out="/elsewhere", threads=1)})  # neutral options
    with pytest.raises(ValueError, match="loss='vicreg'"):
        refresh.check_default_run({"config": dict(config, loss="vicreg")})


def test_every_marked_figure_section_is_generated():
    """The docs' marked sections are exactly those refresh_figures.py knows, each in a file it rewrites."""
    refresh = _refresh_module()
    found = {}
    for path in DOCS:
        for name in re.findall(r"<!-- figures:([a-z0-9-]+) -->", path.read_text()):
            found[name] = path.relative_to(REPO).as_posix()
    assert set(found) == set(refresh.RENDERERS), (found, list(refresh.RENDERERS))
    assert set(found.values()) <= set(refresh.FILES)


# --------------------------------------------------------------------------------------------------
# Nothing refers to a document outside the repository

#: What a reference to the outside looks like. Built from pieces, so that this file does not match itself.
OUTSIDE = {
    "the outside design notes (cite docs/design.md)": re.compile("DESIGN" + r"\.md"),
    "the outside house style": re.compile("STYLE" + r"\.md"),
    "a numbered seed paper (cite the paper by author and year)": re.compile(
        r"(?i)\bseeds?\b[ /_-]*(?:doc\w*|\(?0\d\d)|\(0\d\d\)"
    ),
    "the project's shared folder": re.compile(r"\bshared" + "/"),
    "the issue tracker (say what the requirement is)": re.compile(r"(?i)\bissue\s+#?\d+|foundation" + " issue"),
    "a path on the development machines": re.compile("/wo" + "rk/"),
}
#: Machine output (benchmark JSON, generated reports) is data, not prose: not checked.
OUTSIDE_EXEMPT = ("benchmarks/results/",)


def test_nothing_refers_to_a_document_outside_the_repository():
    hits = []
    for path in _tracked_files():
        name = path.relative_to(REPO).as_posix()
        if name.startswith(OUTSIDE_EXEMPT):
            continue
        text = _text(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            hits += [f"{name}:{number}: {what}: {line.strip()[:120]}" for what, pattern in OUTSIDE.items()
                     if pattern.search(line)]  # fmt: skip
    assert not hits, "references to documents outside the repository:\n" + "\n".join(hits)
