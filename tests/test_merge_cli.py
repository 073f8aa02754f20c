"""`mergetune merge` from a user's seat: outputs, clear errors, nothing half-written."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mergetune.cli import app
from mergetune.demo.tiny import TinySpec, build_family
from mergetune.errors import MergetuneError
from mergetune.merge_ops.sources import resolve_model_directory

runner = CliRunner()


def write_recipe(tmp_path: Path, recipe) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe))
    return path


def slerp(paths, **overrides):
    recipe = {
        "merge_method": "slerp",
        "base_model": str(paths["base"]),
        "models": [{"model": str(paths["base"])}, {"model": str(paths["model_a"])}],
        "parameters": {"t": 0.5},
    }
    recipe.update(overrides)
    return recipe


def test_merge_writes_a_complete_model_directory(family_f32, tmp_path):
    out = tmp_path / "merged"
    result = runner.invoke(app, ["merge", str(write_recipe(tmp_path, slerp(family_f32))), str(out), "--shard-size", "100KB"])
    assert result.exit_code == 0, result.output
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {path.name for path in out.glob("model-*.safetensors")}
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "mergekit_config.yml", "README.md"):
        assert (out / name).exists(), name
    assert "merge_method: slerp" in (out / "README.md").read_text()
    assert not list(tmp_path.glob(".merged.partial-*"))


def test_chat_template_is_written_into_the_tokenizer(family_f32, tmp_path):
    out = tmp_path / "merged"
    result = runner.invoke(app, ["merge", str(write_recipe(tmp_path, slerp(family_f32, chat_template="chatml"))), str(out)])
    assert result.exit_code == 0, result.output
    assert "<|im_start|>" in json.loads((out / "tokenizer_config.json").read_text())["chat_template"]


def test_auto_chat_template_without_one_among_the_inputs_merges_without_a_template_as_mergekit_does(
    family_f32, tmp_path, caplog
):
    out = tmp_path / "merged"
    result = runner.invoke(app, ["merge", str(write_recipe(tmp_path, slerp(family_f32, chat_template="auto"))), str(out)])
    assert result.exit_code == 0, result.output
    assert "none of the input models has a chat template" in caplog.text
    assert not (out / "chat_template.jinja").exists()
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())


def test_the_model_card_names_the_mergekit_command_that_reads_its_recipe(family_f32, tmp_path):
    single = tmp_path / "single"
    assert runner.invoke(app, ["merge", str(write_recipe(tmp_path, slerp(family_f32))), str(single)]).exit_code == 0
    assert "`mergekit-yaml mergekit_config.yml OUT`" in (single / "README.md").read_text()
    stages = yaml.safe_dump_all([{"name": "first", **slerp(family_f32)}, slerp({**family_f32, "model_a": "first"})])
    multi = tmp_path / "multi"
    result = runner.invoke(app, ["merge", str(write_recipe(tmp_path, stages)), str(multi)])
    assert result.exit_code == 0, result.output
    card = (multi / "README.md").read_text()
    assert "`mergekit-multi`" in card and "`mergekit-yaml`" not in card
    merged = card.split("## Models merged")[1].split("Output:")[0]  # the checkpoints, not the stage names
    assert f"* {family_f32['base']} (base)" in merged and f"* {family_f32['model_a']}" in merged and "first" not in merged


def corrupt_copy(paths, tmp_path: Path) -> dict:
    broken = tmp_path / "broken"
    shutil.copytree(paths["model_a"], broken)
    shard = sorted(broken.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:50])
    return {**paths, "model_a": broken}


def pickled_copy(paths, tmp_path: Path) -> dict:
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(paths["model_a"] / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"not really a pickle")
    return {**paths, "model_a": pickled}


def deeper_copy(paths, tmp_path: Path) -> dict:
    six = build_family(tmp_path / "six", names=("base",), spec=TinySpec(num_hidden_layers=6))["base"]
    return {**paths, "model_a": six}


def other_architecture_copy(paths, tmp_path: Path) -> dict:
    other = tmp_path / "mistral"
    shutil.copytree(paths["model_a"], other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    return {**paths, "model_a": other}


def wider_copy(paths, tmp_path: Path) -> dict:
    wide = build_family(tmp_path / "wide", names=("base",), spec=TinySpec(intermediate_size=96))["base"]
    return {**paths, "model_a": wide}


def narrower_copy(paths, tmp_path: Path) -> dict:
    narrow = build_family(tmp_path / "narrow", names=("base",), spec=TinySpec(hidden_size=32))["base"]
    return {**paths, "model_a": narrow}


HOSTILE = [
    ("unknown method", lambda p, d: slerp(p, merge_method="slurp"), "unknown merge_method 'slurp'"),
    ("unknown parameter", lambda p, d: slerp(p, parameters={"t": 0.5, "temperature": 1}), "unknown parameter 'temperature' for slerp"),
    ("empty gradient", lambda p, d: slerp(p, parameters={"t": []}), "parameters.t: empty gradient list"),
    (
        "negative DARE density",
        lambda p, d: {
            "merge_method": "dare_ties",
            "base_model": str(p["base"]),
            "models": [{"model": str(p["model_a"]), "parameters": {"weight": 1, "density": -0.1}}],
        },
        "density: -0.1 is below 0.0: dare_ties cannot merge it (mergekit 0.1.5 fails on it too)",
    ),
    ("wrong type", lambda p, d: slerp(p, parameters={"t": "half"}), "parameters.t: 'half' is not valid"),
    ("unknown field", lambda p, d: {**slerp(p), "paramters": {}}, "paramters: unknown field"),
    (
        "misspelt key in a filter list (a union: only the alternative written is described)",
        lambda p, d: slerp(p, parameters={"t": [{"filter": "mlp", "value": 0.3}, {"valu": 0.5}]}),
        "recipe.yaml: parameters.t.1.value: Field required; parameters.t.1.valu: unknown field\n",
    ),
    ("missing base", lambda p, d: {k: v for k, v in slerp(p).items() if k != "base_model"}, "slerp needs a base_model"),
    ("missing model dir", lambda p, d: slerp({**p, "model_a": d / "nowhere"}), "nowhere: no such directory"),
    ("corrupt shard", lambda p, d: slerp(corrupt_copy(p, d)), "corrupt or truncated"),
    ("pickled weights", lambda p, d: slerp(pickled_copy(p, d)), "pass --allow-pickle if you trust this model"),
    ("layer counts differ", lambda p, d: slerp(deeper_copy(p, d)), "need the same number of layers"),
    (
        "shapes differ",
        lambda p, d: slerp(wider_copy(p, d)),
        "tensor model.layers.0.mlp.down_proj.weight: shape [64, 128] in",
    ),
    (
        "hidden sizes differ (same vocabulary)",
        lambda p, d: slerp(narrower_copy(p, d)),
        "/narrow/base (model.embed_tokens.weight) — the models are not the same architecture (hidden or "
        "intermediate sizes differ)",
    ),
    ("architectures differ", lambda p, d: slerp(other_architecture_copy(p, d)), "different architectures"),
    (
        "not yaml",
        lambda p, d: "merge_method: [slerp",
        "recipe.yaml, line 1, column 21: not valid YAML: while parsing a flow sequence: expected ',' or ']'",
    ),
    ("not a mapping", lambda p, d: "- just\n- a list\n", "a recipe must be a mapping"),
    ("models and slices", lambda p, d: {**slerp(p), "slices": [{"sources": [{"model": "x", "layer_range": [0, 1]}]}]}, "exactly one of 'models' or 'slices'"),
    ("a LoRA adapter", lambda p, d: slerp({**p, "model_a": f"{p['model_a']}+{p['model_b']}"}), "LoRA adapters (model+adapter) are not supported"),
    ("a hub revision", lambda p, d: slerp({**p, "model_a": "org/model@main"}), "revisions (model@revision) are not supported"),
    ("a mergekit template name", lambda p, d: slerp(p, chat_template="llama3"), "'llama3' is one of mergekit's built-in templates"),
    (
        "tokenizer section with added tokens",
        lambda p, d: slerp(p, tokenizer={"source": "base", "tokens": {"<x>": {"source": "base"}}}),
        "tokenizer.tokens and tokenizer.pad_to_multiple_of are not supported",
    ),
    ("both tokenizer settings", lambda p, d: slerp(p, tokenizer_source="base", tokenizer={"source": "base"}), "either tokenizer_source or tokenizer"),
    ("tokenizer source missing", lambda p, d: slerp(p, tokenizer_source=str(d / "nowhere")), "tokenizer_source: model /"),
]


@pytest.mark.parametrize("case, make, message", HOSTILE, ids=[case for case, _, _ in HOSTILE])
def test_bad_input_gives_one_clear_message_and_writes_nothing(case, make, message, family_f32, tmp_path):
    recipe = write_recipe(tmp_path, make(family_f32, tmp_path))
    out = tmp_path / "out"
    result = runner.invoke(app, ["merge", str(recipe), str(out)])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not out.exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_overwrite_never_replaces_a_tokenizer_source_that_is_merged_nowhere(family_f32, tmp_path):
    donor = shutil.copytree(family_f32["model_b"], tmp_path / "donor")
    before = sorted(p.name for p in donor.iterdir())
    recipe = write_recipe(tmp_path, slerp(family_f32, tokenizer_source=str(donor)))
    result = runner.invoke(app, ["merge", str(recipe), str(donor), "--overwrite"])
    assert result.exit_code == 2, result.output
    assert f"output directory {donor} is the tokenizer source {donor}" in result.output
    assert sorted(p.name for p in donor.iterdir()) == before


def test_missing_recipe_file_is_named(tmp_path):
    result = runner.invoke(app, ["merge", str(tmp_path / "nope.yaml"), str(tmp_path / "out")])
    assert result.exit_code == 2 and "recipe file not found" in result.output


def test_filter_that_matches_nothing_warns_but_merges(family_f32, tmp_path):
    recipe = slerp(family_f32, parameters={"t": [{"filter": "attention_sink", "value": 0.1}, {"value": 0.5}]})
    result = runner.invoke(app, ["merge", str(write_recipe(tmp_path, recipe)), str(tmp_path / "out")])
    assert result.exit_code == 0
    assert "filter 'attention_sink' matches no tensor" in result.output


def test_filter_entries_an_earlier_entry_hides_warn_but_merge(family_f32, tmp_path):
    t = [
        {"filter": "self_attn", "value": 0.1},
        {"filter": "self_attn.q_proj", "value": 0.9},  # every such tensor matches self_attn first
        {"value": 0.5},
        {"filter": "mlp", "value": 0.3},  # the entry without a filter matches everything first
    ]
    result = runner.invoke(app, ["merge", str(write_recipe(tmp_path, slerp(family_f32, parameters={"t": t}))), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "parameters.t: the filter 'self_attn.q_proj' never applies: the earlier filter 'self_attn' matches first" in result.output
    assert "parameters.t: the filter 'mlp' never applies: the earlier entry without a filter matches first" in result.output
    assert "'self_attn' never applies" not in result.output


def test_existing_output_is_refused_unless_overwrite(family_f32, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    recipe = str(write_recipe(tmp_path, slerp(family_f32)))
    assert runner.invoke(app, ["merge", recipe, str(out)]).exit_code == 2
    assert runner.invoke(app, ["merge", recipe, str(out), "--overwrite"]).exit_code == 0
    assert (out / "model.safetensors").exists()
    assert runner.invoke(app, ["merge", recipe, str(out), "--overwrite"]).exit_code == 0  # an earlier output: replaced


def test_overwrite_never_replaces_a_folder_that_holds_no_model(family_f32, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    result = runner.invoke(app, ["merge", str(write_recipe(tmp_path, slerp(family_f32))), str(precious), "--overwrite"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"output directory {precious} holds files but no model (config.json or mergekit_config.yml)" in result.output
    assert [p.name for p in precious.iterdir()] == ["thesis.tex"] and (precious / "thesis.tex").read_text() == "years of work"


def merge_in_a_child(prelude: str, family: dict, tmp_path: Path) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """A SLERP of `family` merged by the console script in a fresh process, after `prelude` (which may use atexit,
    os, signal, sys and time): the process, the recipe and the output directory."""
    recipe, out = write_recipe(tmp_path, slerp(family)), tmp_path / "out"
    script = (
        "import atexit, os, signal, sys, time\n"
        f"{prelude}"
        "from mergetune.cli import run\n"
        f"sys.argv = ['mergetune', 'merge', {str(recipe)!r}, {str(out)!r}]\n"
        "run()\n"
    )
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120), recipe, out


def test_a_merge_killed_midway_leaves_no_output_directory_and_the_next_merge_clears_its_leftovers(family_f32, tmp_path):
    """SIGKILL during the merge: the target never appears; the hidden partial directory goes with the next merge."""
    killed_at_the_fifth_tensor = (
        "import mergetune.merge_ops.writer as writer\n"
        "original = writer.ShardedWriter.write\n"
        "def write(self, name, tensor):\n"
        "    if self._position == 5: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    original(self, name, tensor)\n"
        "writer.ShardedWriter.write = write\n"
    )
    completed, recipe, out = merge_in_a_child(killed_at_the_fifth_tensor, family_f32, tmp_path)
    assert completed.returncode == -9
    assert not out.exists()
    leftovers = list(tmp_path.glob(".out.partial-*"))
    assert len(leftovers) == 1
    assert runner.invoke(app, ["merge", str(recipe), str(out)]).exit_code == 0
    assert (out / "model.safetensors").exists() and not leftovers[0].exists()


def test_a_ctrl_c_once_a_merge_is_written_changes_neither_its_output_nor_its_exit_code(family_f32, tmp_path):
    """The Ctrl-C arrives as the interpreter shuts down (here from an exit hook, as torch's run then)."""
    ctrl_c_at_exit = (
        "signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal\n"
        "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(0.5)))\n"
    )
    completed, _, out = merge_in_a_child(ctrl_c_at_exit, family_f32, tmp_path)
    assert completed.returncode == 0, completed.stderr
    assert "KeyboardInterrupt" not in completed.stderr and "Traceback" not in completed.stderr
    assert (out / "model.safetensors").exists()


def test_a_sigterm_as_the_finished_merge_replaces_the_old_one_lets_it_end_as_a_success(
    family_f32, tmp_path, monkeypatch, as_a_scheduled_job
):
    """Raised while the new output moved into place, the signal reported a merge failed whose new output was already
    there, and left the old one half deleted beside it."""
    import mergetune.merge_ops.writer as writer

    out, recipe = tmp_path / "out", write_recipe(tmp_path, slerp(family_f32))
    assert runner.invoke(app, ["merge", str(recipe), str(out)]).exit_code == 0
    move = writer._move_into_place

    def signalled_as_it_moves(partial: Path, target: Path) -> None:
        move(partial, target)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)  # handled here, as the move ends

    monkeypatch.setattr(writer, "_move_into_place", signalled_as_it_moves)
    recipe.write_text(yaml.safe_dump(slerp(family_f32, parameters={"t": 0.25})))
    result = runner.invoke(app, ["merge", str(recipe), str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert "t: 0.25" in (out / "mergekit_config.yml").read_text() and not list(tmp_path.glob(".out.*"))


def test_ctrl_c_exits_130_and_cleans_up(family_f32, tmp_path, monkeypatch):
    import mergetune.merge_ops.writer as writer

    def interrupted(self, name, tensor):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer.ShardedWriter, "write", interrupted)
    out = tmp_path / "out"
    result = runner.invoke(app, ["merge", str(write_recipe(tmp_path, slerp(family_f32))), str(out)])
    assert result.exit_code == 130
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_pickled_weights_load_with_allow_pickle(family_f32, tmp_path):
    import torch

    from mergetune.demo.tiny import load_state

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(family_f32["model_a"] / "config.json", pickled / "config.json")
    torch.save(load_state(family_f32["model_a"]), pickled / "pytorch_model.bin")
    recipe = write_recipe(tmp_path, slerp({**family_f32, "model_a": pickled}))
    result = runner.invoke(app, ["merge", str(recipe), str(tmp_path / "out"), "--allow-pickle"])
    assert result.exit_code == 0, result.output


def test_a_mistyped_local_path_that_reads_as_a_hub_id_says_so_in_one_line(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("Name or service not known\n(a second line of hub detail)")

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(MergetuneError) as raised:
        resolve_model_directory("models/mistyped")
    assert str(raised.value) == (
        "model models/mistyped: no such local directory (models/ is a folder here: a typo in a local path?), "
        "and fetching it from the hub failed: Name or service not known"
    )
