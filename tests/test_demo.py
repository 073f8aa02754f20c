"""The README's main command: `mergetune demo` builds its models, searches, and beats the hand-written recipes."""

from __future__ import annotations

import re

import optuna
from typer.testing import CliRunner

from mergetune.cli import app
from mergetune.search.trials import DEFINITION, DEFINITION_HASH

runner = CliRunner()

BEATS = re.compile(
    r"search beats the hand-written (slerp|dare_ties) recipe on held-out documents: "
    r"([\d.]+) → ([\d.]+) \(\+[\d.]+ points, 95% CI \+([\d.]+) … \+[\d.]+\)"
)


def test_the_demo_beats_both_hand_written_recipes_on_held_out_facts_and_exports_the_best(tmp_path):
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--out-dir", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    verdicts = {method: (float(hand), float(best), float(low)) for method, hand, best, low in BEATS.findall(result.output)}
    assert set(verdicts) == {"slerp", "dare_ties"}, result.output
    for hand, best, ci_low in verdicts.values():
        assert best >= hand + 20 and ci_low >= 10, result.output  # not a near miss: a clear, significant margin
    assert "demo_arithmetic_heldout" in result.output and "demo_capitals_heldout" in result.output
    for name in ("mergekit_config.yml", "model.safetensors", "config.json", "tokenizer.json", "README.md"):
        assert (out / "best-merge" / name).is_file(), name

    stamp = (out / "models" / "demo-models.json").stat().st_mtime_ns
    again = runner.invoke(app, ["demo", "--out-dir", str(out), "--quiet"])  # continues the finished study
    assert again.exit_code == 0, again.output
    assert BEATS.findall(again.output) == BEATS.findall(result.output)
    assert (out / "models" / "demo-models.json").stat().st_mtime_ns == stamp  # models reused, not rebuilt

    storage = f"sqlite:///{out / 'demo.db'}"
    stored = optuna.load_study(study_name="demo.slerp", storage=storage)
    older_demo = {**stored.user_attrs[DEFINITION], "evaluation": {**stored.user_attrs[DEFINITION]["evaluation"], "limit": 60}}
    stored.set_user_attr(DEFINITION, older_demo)
    stored.set_user_attr(DEFINITION_HASH, "an-older-demo")
    changed = runner.invoke(app, ["demo", "--out-dir", str(out), "--quiet"])  # as after an upgrade of the demo
    assert changed.exit_code == 0, changed.output
    assert "the demo's study has changed since the trials in" in changed.output
    assert BEATS.findall(changed.output) == BEATS.findall(result.output)  # searched afresh, same seeds


def test_a_trial_count_below_one_is_refused_before_the_demo_writes_anything(tmp_path):
    for count in ("0", "-1"):
        result = runner.invoke(app, ["demo", "--out-dir", str(tmp_path / "demo"), "--n-trials", count])
        assert result.exit_code == 2 and f"--n-trials: must be a finite number of at least 1, got {count}" in result.output
        assert not (tmp_path / "demo").exists()
