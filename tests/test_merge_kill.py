"""A merge stopped at any moment (SIGKILL, Ctrl-C, SIGTERM) leaves its inputs byte-identical and no finished-looking output.

The merge runs in a child process whose writer is slowed down a little, so the
signal lands while tensors are being written (or, for the later delays, while the
directory is being moved into place, or after).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mergetune.cli import app

runner = CliRunner()
# The child stands for a merge run in a terminal, where Ctrl-C raises KeyboardInterrupt. Started from a shell's
# background job (`cmd &` without job control, as CI scripts may run pytest) it would inherit SIGINT ignored and
# never see the signal, so its handler is set back to Python's default first (SIGTERM's too, for the same reason).
SLOW_MERGE = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGTERM, signal.SIG_DFL)
import mergetune.merge_ops.writer as writer
original = writer.ShardedWriter.write
def write(self, name, tensor):
    time.sleep(float(os.environ["SECONDS_PER_TENSOR"]))
    original(self, name, tensor)
writer.ShardedWriter.write = write
from mergetune.cli import app
sys.argv = ["mergetune", *sys.argv[1:]]
app()
"""


def tree(root: Path) -> dict[str, str]:
    """Every file under `root` by relative path, with its content hash."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def write_recipe(tmp_path: Path, family: dict, t: float) -> Path:
    recipe = {
        "merge_method": "slerp",
        "base_model": str(family["base"]),
        "models": [{"model": str(family["base"])}, {"model": str(family["model_a"])}],
        "parameters": {"t": t},
    }
    path = tmp_path / f"recipe-{t}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def start_merge(recipe: Path, out: Path, *flags: str, seconds_per_tensor: float, quiet: bool = True) -> subprocess.Popen:
    """The merge in a child process; returns once it has begun writing (its hidden partial directory exists)."""
    environment = {**os.environ, "SECONDS_PER_TENSOR": str(seconds_per_tensor)}
    child = subprocess.Popen(
        [sys.executable, "-c", SLOW_MERGE, "merge", str(recipe), str(out), *["--quiet"] * quiet, *flags],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not list(out.parent.glob(f".{out.name}.partial-*")) and child.poll() is None:
        assert time.monotonic() < deadline, "the merge never started writing"
        time.sleep(0.005)
    return child


@pytest.fixture(scope="module")
def merges(family_f32, tmp_path_factory) -> dict:
    """Two recipes and, for each, what a finished merge writes: the only outputs allowed to appear."""
    tmp = tmp_path_factory.mktemp("kill")
    finished = {}
    for t in (0.3, 0.7):
        recipe = write_recipe(tmp, family_f32, t)
        result = runner.invoke(app, ["merge", str(recipe), str(tmp / f"reference-{t}")])
        assert result.exit_code == 0, result.output
        finished[t] = (recipe, tree(tmp / f"reference-{t}"))
    return finished


def inputs(family: dict) -> dict[str, dict[str, str]]:
    return {name: tree(path) for name, path in family.items()}


@pytest.mark.parametrize("delay", [0.0, 0.03, 0.1, 0.25, 0.6])
def test_a_merge_killed_at_any_moment_leaves_inputs_intact_and_no_half_output(delay, merges, family_f32, tmp_path):
    recipe, finished = merges[0.3]
    out = tmp_path / "out"
    before = inputs(family_f32)
    child = start_merge(recipe, out, seconds_per_tensor=0.01)
    time.sleep(delay)
    child.kill()
    child.communicate(timeout=60)
    assert inputs(family_f32) == before
    assert not out.exists() or tree(out) == finished  # absent, or the complete merge
    # The next merge clears what the killed one left behind.
    assert runner.invoke(app, ["merge", str(recipe), str(out), "--overwrite"]).exit_code == 0
    assert tree(out) == finished and not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize("delay", [0.05, 0.3, 0.6])
def test_an_overwrite_killed_at_any_moment_leaves_the_old_output_or_the_new_one(delay, merges, tmp_path):
    (old_recipe, old), (new_recipe, new) = merges[0.3], merges[0.7]
    out = tmp_path / "out"
    assert runner.invoke(app, ["merge", str(old_recipe), str(out)]).exit_code == 0
    child = start_merge(new_recipe, out, "--overwrite", seconds_per_tensor=0.01)
    time.sleep(delay)
    child.kill()
    child.communicate(timeout=60)
    if out.exists():
        assert tree(out) in (old, new)
    else:  # killed between moving the old one aside and the new one in: both are kept, hidden beside it
        assert [tree(path) for path in sorted(tmp_path.glob(".out.*"))] == [new, old]  # .partial-, .replaced-


@pytest.mark.parametrize(
    "signum, code, said",
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],  # Ctrl-C; `kill`, a scheduler, `timeout`
)
def test_ctrl_c_or_sigterm_during_a_merge_exits_and_removes_the_partial_output(signum, code, said, merges, family_f32, tmp_path):
    """With the progress bar drawn: the message is the last line, not glued to the bar and drawn over by it."""
    recipe, _ = merges[0.3]
    out = tmp_path / "out"
    before = inputs(family_f32)
    child = start_merge(recipe, out, seconds_per_tensor=0.05, quiet=False)
    time.sleep(0.1)
    child.send_signal(signum)
    _, stderr = child.communicate(timeout=60)  # the bar's carriage returns read as line ends
    assert child.returncode == code, stderr
    assert stderr.strip().splitlines()[-1] == said and "Traceback" not in stderr
    assert inputs(family_f32) == before
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
