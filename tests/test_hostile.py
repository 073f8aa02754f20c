"""Hostile input and failing trials: one clear message, exit 2, no traceback, nothing half-written, no secret shown."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from optuna.trial import TrialState
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import mergetune.merge_ops.writer as writer
import mergetune.search.runner as runner_module
from mergetune.cli import app
from mergetune.merge_ops.card import model_card
from mergetune.merge_ops.plan import plan_merge
from mergetune.merge_ops.recipe import recipe_from_dict
from mergetune.merge_ops.sources import open_source
from mergetune.search.export import score_table
from mergetune.search.leaderboard import Leaderboard, Row
from mergetune.eval.evidence import Summary, TaskSummary
from mergetune.search.report import _html_table
from mergetune.search.storage import redact
from mergetune.demo.tiny import TinySpec, build_family

pytest.register_assert_rewrite("scaleout_fixtures")
from scaleout_fixtures import COUNTED, stored_trials, write_study  # noqa: E402

pytest_plugins = ["scaleout_fixtures"]
runner = CliRunner()
PASSWORD = "s3cret-pw"
N = 4


class FillingDisk:
    """A file on a disk with `room` bytes left: the write that needs more fails with ENOSPC."""

    room = 60_000

    def __init__(self, path, mode):
        self.file = open(path, mode)

    def write(self, data) -> int:
        FillingDisk.room -= memoryview(data).nbytes
        if FillingDisk.room < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.file.write(data)

    def close(self) -> None:
        self.file.close()


@pytest.fixture(scope="module")
def failing_study(tmp_path_factory, family_f32, tiny_tasks) -> Path:
    """A study of N trials during which the evaluator once raises and once runs out of memory."""
    calls = []
    score = runner_module.StudyRunner.score

    def flaky_score(self, ids):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("evaluator exploded")
        if len(calls) == 6:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return score(self, ids)

    path = write_study(tmp_path_factory.mktemp("failing"), family_f32, tiny_tasks, budget={"n_trials": N})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner_module.StudyRunner, "score", flaky_score)
        result = runner.invoke(app, ["study", "run", str(path), "--quiet"])
    assert result.exit_code == 0, result.output
    return path


def test_failing_trials_are_stored_with_their_reason_and_the_study_goes_on(failing_study):
    trials = stored_trials(failing_study)
    assert sum(t.state in COUNTED for t in trials) == N
    reasons = [t.user_attrs["fail_reason"] for t in trials if t.state == TrialState.FAIL]
    assert reasons == [
        "RuntimeError: evaluator exploded",
        "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB",
    ]


def test_the_leaderboard_lists_failed_trials_with_their_reasons_and_ranks_only_the_others(failing_study, tmp_path):
    board_json = tmp_path / "board.json"
    result = runner.invoke(app, ["leaderboard", str(failing_study), "--json", str(board_json)])
    assert result.exit_code == 0, result.output
    failed = [t.number for t in stored_trials(failing_study) if t.state == TrialState.FAIL]
    board = json.loads(board_json.read_text())
    assert [(f["trial"], f["reason"]) for f in board["failures"]] == [
        (failed[0], "RuntimeError: evaluator exploded"),
        (failed[1], "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB"),
    ]
    assert not {row["trial"] for row in board["rows"]} & set(failed) and len(board["rows"]) == N
    assert (
        f"slerp: 2 failed trials, not ranked (trial {failed[0]}: RuntimeError: evaluator exploded; "
        f"trial {failed[1]}: out of memory: CUDA out of memory. Tried to allocate 2.00 GiB)"
    ) in " ".join(result.output.split())



def test_a_search_space_filter_that_matches_no_tensor_is_a_warning_before_the_first_trial(
    family_f32, tiny_tasks, tmp_path, caplog
):
    space = {"slerp": {"filters": ["self_atn"], "control_points": 2}}
    path = write_study(tmp_path, family_f32, tiny_tasks, budget={"n_trials": 1}, space=space)
    with caplog.at_level("WARNING", logger="mergetune.search.workspace"):
        result = runner.invoke(app, ["study", "run", str(path), "--quiet"])
    assert result.exit_code == 0, result.output
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        "slerp (its hand-written recipe, as the study's space writes it): parameters.t: filter 'self_atn' matches no tensor"
    ]

def nan_copy(model: Path, directory: Path) -> Path:
    """A copy of `model` with one tensor full of NaN."""
    copy = directory / "nan-model"
    shutil.copytree(model, copy)
    name = "model.layers.0.mlp.down_proj.weight"
    shard = copy / json.loads((copy / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, shard, metadata={"format": "pt"})
    return copy


def test_nan_weights_fail_each_trial_and_a_run_of_failures_stops_the_study(family_f32, tiny_tasks, tmp_path):
    family = {**family_f32, "model_b": nan_copy(family_f32["model_b"], tmp_path)}
    path = write_study(tmp_path, family, tiny_tasks)
    result = runner.invoke(app, ["study", "run", str(path), "--quiet", "--max-failures", "3"])
    assert result.exit_code == 2, result.output
    assert "stopped after 3 failed trials in a row; the last, trial 2: merged weights are not finite" in result.output
    assert "Traceback" not in result.output
    trials = stored_trials(path)
    assert [t.state for t in trials] == [TrialState.FAIL] * 3
    assert all("NaN or inf in model.layers.0.mlp.down_proj.weight" in t.user_attrs["fail_reason"] for t in trials)
    board = runner.invoke(app, ["leaderboard", str(path)])
    assert board.exit_code != 0 and "Traceback" not in board.output
    assert "has no completed trials" in board.output
    assert "slerp: 3 failed trials, not ranked (trials 0, 1, 2: merged weights are not finite" in " ".join(
        board.output.split()
    )


@dataclass
class Inputs:
    """What a hostile case builds its command line from."""

    tmp: Path
    family: dict
    tasks: Path
    monkeypatch: pytest.MonkeyPatch
    request: pytest.FixtureRequest

    def study(self, family: dict | None = None, **overrides) -> str:
        return str(write_study(self.tmp, family or self.family, self.tasks, **overrides))

    def model_copy(self, name: str, damage: Callable[[Path], None], file: str = "model-*.safetensors") -> dict:
        """The family with `name` replaced by a copy whose first `file` is damaged."""
        copy = self.tmp / "damaged"
        shutil.copytree(self.family[name], copy)
        damage(sorted(copy.glob(file))[0])
        return {**self.family, name: copy}

    def local_family(self) -> dict:
        """Copies of base and model_a under tmp/models: inputs a wrong output path could destroy."""
        return {name: shutil.copytree(self.family[name], self.tmp / "models" / name) for name in ("base", "model_a")}

    def link_to(self, target: Path) -> str:
        link = self.tmp / "link"
        link.symlink_to(target, target_is_directory=True)
        return str(link)

    def pickled_non_state_dict(self) -> dict:
        pickled = self.tmp / "pickled"
        pickled.mkdir()
        shutil.copy(self.family["model_a"] / "config.json", pickled / "config.json")
        torch.save([torch.zeros(2)], pickled / "pytorch_model.bin")
        return {**self.family, "model_a": pickled}

    def file_at(self, name: str) -> str:
        (self.tmp / name).write_text("my notes\n")
        return str(self.tmp / name)

    def recipe(self, family: dict | None = None, **changes) -> str:
        family = family or self.family
        recipe = {
            "merge_method": "slerp",
            "base_model": str(family["base"]),
            "models": [{"model": str(family["base"])}, {"model": str(family["model_a"])}],
            "parameters": {"t": 0.5},
            **changes,
        }
        path = self.tmp / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe))
        return str(path)

    def six_layer_model(self) -> Path:
        return build_family(self.tmp / "six", names=("base",), spec=TinySpec(num_hidden_layers=6))["base"]

    def silent_server(self) -> int:
        """A port that accepts connections and never says a word."""
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        self.request.addfinalizer(server.close)
        return server.getsockname()[1]

    def on_a_filling_disk(self, args: list[str]) -> list[str]:
        self.monkeypatch.setattr(FillingDisk, "room", FillingDisk.room)
        self.monkeypatch.setattr(writer, "open", FillingDisk, raising=False)
        return args

    def junk_journal(self) -> str:
        (self.tmp / "junk.log").write_text("these are\nnot journal records\n")
        return str(self.tmp / "junk.log")

    def evaluation(self, **changes) -> str:
        """A study whose `evaluation:` section has `changes`."""
        path = Path(self.study())
        spec = yaml.safe_load(path.read_text())
        spec["evaluation"].update(changes)
        path.write_text(yaml.safe_dump(spec))
        return str(path)

    def weightless_model(self) -> str:
        """model_a's config and tokenizer without its weights."""
        copy = shutil.copytree(self.family["model_a"], self.tmp / "weightless", ignore=shutil.ignore_patterns("*.safetensors*"))
        return str(copy)

    def data_dir_missing_a_split(self) -> str:
        """Local data for arc_easy with its train and test files but no validation file."""
        folder = self.tmp / "data" / "arc_easy"
        folder.mkdir(parents=True)
        for split in ("train", "test"):
            (folder / f"{split}.jsonl").write_text("{}\n")
        return str(self.tmp / "data")

    def data_dir_with_arc_easy_only(self) -> str:
        """Local data for arc_easy alone (files that need not parse: the check comes first)."""
        folder = self.tmp / "data" / "arc_easy"
        folder.mkdir(parents=True)
        for split in ("train", "validation", "test"):
            (folder / f"{split}.jsonl").write_text("{}\n")
        return str(self.tmp / "data")

    def data_dir_with_a_garbage_line(self) -> str:
        folder = self.tmp / "data" / "arc_easy"
        folder.mkdir(parents=True)
        row = {"id": "1", "question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "A"}
        for split in ("train", "validation", "test"):
            (folder / f"{split}.jsonl").write_text(json.dumps(row) + "\nnot json\n")
        return str(self.tmp / "data")

    def task_dir_with_a_broken_yaml(self) -> str:
        folder = shutil.copytree(self.tasks, self.tmp / "tasks")
        (folder / "broken.yaml").write_text("task: demo_broken\n  doc_to_text: [\n")
        return str(folder)

    def read_only_folder(self) -> Path:
        """A folder this user cannot write to (root writes anyway: then the tool's access check is told so)."""
        folder = self.tmp / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        self.request.addfinalizer(lambda: folder.chmod(0o755))
        if os.geteuid() == 0:
            real_access = os.access

            def access(path, mode, **options) -> bool:
                return not (Path(path) == folder and mode & os.W_OK) and real_access(path, mode, **options)

            self.monkeypatch.setattr(os, "access", access)
        return folder

    def sparse_file(self, name: str, size: int) -> str:
        (self.tmp / name).write_bytes(b"")
        os.truncate(self.tmp / name, size)
        return str(self.tmp / name)

    def alias_bomb(self) -> str:
        """A study file whose YAML aliases expand to 9**9 strings (a "billion laughs")."""
        lines = ['l0: &l0 "lol"'] + [f"l{n}: &l{n} [{', '.join([f'*l{n - 1}'] * 9)}]" for n in range(1, 10)]
        (self.tmp / "bomb.yaml").write_text("\n".join(lines + ["name: *l9", "models: *l9"]) + "\n")
        return str(self.tmp / "bomb.yaml")


def run(*args: str) -> list[str]:
    return list(args)


def stored_study(i: "Inputs") -> str:
    """A study with stored trials (the module's `failing_study`)."""
    return str(i.request.getfixturevalue("failing_study"))


def edit_header(change: Callable[[dict], None]) -> Callable[[Path], None]:
    """Damage that rewrites a safetensors shard's JSON header, keeping its data bytes."""

    def damage(shard: Path) -> None:
        raw = shard.read_bytes()
        length = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8 : 8 + length])
        change(header)
        text = json.dumps(header).encode()
        shard.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length :])

    return damage


def first_tensor(header: dict) -> dict:
    return header[next(name for name in header if name != "__metadata__")]


def raw_header(text: bytes) -> Callable[[Path], None]:
    return lambda shard: shard.write_bytes(struct.pack("<Q", len(text)) + text)


def huge_header(shard: Path) -> None:
    """A header length of 1 TiB in a (sparse) file long enough to hold it: the reader must not allocate it."""
    shard.write_bytes(struct.pack("<Q", 2**40))
    os.truncate(shard, 2**40 + 64)


def quantized(shard: Path) -> None:
    """One tensor stored as int8, as a quantized checkpoint has it."""
    tensors = load_file(shard)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].to(torch.int8)
    save_file(tensors, shard, metadata={"format": "pt"})


def linear_recipe(i: "Inputs", weights: tuple[float, float]) -> str:
    models = [{"model": str(i.family[name]), "parameters": {"weight": w}} for name, w in zip(("base", "model_a"), weights)]
    return i.recipe(merge_method="linear", models=models, parameters={"normalize": True})


HOSTILE: list[tuple[str, Callable[[Inputs], list[str]], str]] = [
    (
        "corrupt safetensors",
        lambda i: run("study", "run", i.study(i.model_copy("model_b", lambda f: f.write_bytes(b"\xff" * 64)))),
        "is corrupt or truncated (header of",
    ),
    (
        "truncated safetensors",
        lambda i: run("study", "run", i.study(i.model_copy("model_b", lambda f: f.write_bytes(f.read_bytes()[:-100])))),
        "is corrupt or truncated (tensor model.layers.0.self_attn",
    ),
    (
        "study: wrong type",
        lambda i: run("study", "run", i.study(budget={"n_trials": "many"})),
        "budget.n_trials: Input should be a valid integer",
    ),
    (
        "study: an in-memory database",
        lambda i: run("study", "run", i.study(storage="sqlite:///:memory:")),
        "storage sqlite:///:memory:: an in-memory SQLite database keeps nothing after the run",
    ),
    (
        "study: unknown key",
        lambda i: run("study", "run", i.study(storage_options={"heartbeat": 3})),
        "storage_options.heartbeat: unknown field",
    ),
    (
        "study: grace period shorter than heartbeat",
        lambda i: run("study", "run", i.study(storage_options={"heartbeat_interval": 10, "grace_period": 5})),
        "grace_period (5) must be longer than heartbeat_interval (10)",
    ),
    ("study file missing", lambda i: run("study", "run", str(i.tmp / "nope.yaml")), "study file not found"),
    (
        "model path missing",
        lambda i: run("study", "run", i.study({**i.family, "model_b": i.tmp / "nowhere"})),
        "nowhere: no such directory",
    ),
    (
        "models that don't fit together",
        lambda i: run("study", "run", i.study({**i.family, "model_b": i.six_layer_model()})),
        "need the same number of layers",
    ),
    (
        "recipe: wrong type",
        lambda i: run("merge", i.recipe(models=3), str(i.tmp / "out")),
        "models: Input should be a valid list",
    ),
    (
        "recipe: a method's contract, named with the file",
        lambda i: run("merge", i.recipe(base_model=None), str(i.tmp / "out")),
        "{tmp}/recipe.yaml: slerp needs a base_model",
    ),
    (
        "recipe: a layer range past the model's layers, named with the file",
        lambda i: run("merge", i.recipe(
            merge_method="passthrough", base_model=None, models=None, parameters=None,
            slices=[{"sources": [{"model": str(i.family["base"]), "layer_range": [0, 9]}]}],
        ), str(i.tmp / "out")),
        "{tmp}/recipe.yaml: slice 0: layer_range [0, 9] of ",
    ),
    (
        "recipe: a gradient of lists",
        lambda i: run("merge", i.recipe(parameters={"t": [[0, 1], 0.5]}), str(i.tmp / "out")),
        "parameters.t: [[0, 1], 0.5] is none of: true/false, an integer, a number, a string, a list of values,",
    ),
    (
        "recipe: true where a weight is expected",
        lambda i: run("merge", linear_recipe(i, (True, 1)), str(i.tmp / "out")),
        "parameters.weight: True is not valid: true/false where a number is expected",
    ),
    (
        "recipe: unknown key",
        lambda i: run("merge", i.recipe(models=[{"model": str(i.family["base"]), "wieght": 1}]), str(i.tmp / "out")),
        "models.0.wieght: unknown field",
    ),
    (
        "storage refuses connections",
        lambda i: run("study", "run", i.study(), "--storage", f"postgresql://mergetune:{PASSWORD}@127.0.0.1:1/db"),
        "cannot reach the study storage postgresql://mergetune:***@127.0.0.1:1/db: connection failed",
    ),
    (
        "storage never answers",
        lambda i: run(
            "study", "run", i.study(), "--storage", f"postgresql://mergetune:{PASSWORD}@127.0.0.1:{i.silent_server()}/db"
        ),
        "connection timeout expired",
    ),
    (
        "storage URL of an unknown kind",
        lambda i: run("study", "run", i.study(), "--storage", f"mongodb://mergetune:{PASSWORD}@host/db"),
        "storage mongodb://mergetune:***@host/db: not a storage URL this tool knows",
    ),
    (
        "journal in a missing directory",
        lambda i: run("study", "run", i.study(), "--storage", f"journal://{i.tmp}/nowhere/study.log"),
        "/nowhere does not exist",
    ),
    (
        "journal that isn't one",
        lambda i: run("study", "run", i.study(), "--storage", i.junk_journal()),
        "not a study journal, or damaged",
    ),
    ("device this machine lacks", lambda i: run("study", "run", i.study(), "--device", "cuda:99"), "device cuda:99: "),
    (
        "disk fills during a merge",
        lambda i: i.on_a_filling_disk(run("merge", i.recipe(), str(i.tmp / "out"), "--shard-size", "20KB")),
        "cannot write {tmp}/out: No space left on device; nothing was written there",
    ),
    (
        "disk fills during an export",
        lambda i: i.on_a_filling_disk(run("export", str(i.request.getfixturevalue("failing_study")), str(i.tmp / "out"))),
        "cannot write {tmp}/out: No space left on device; nothing was written there",
    ),
    # An output that is, holds or lies inside an input is refused, even with --overwrite.
    (
        "merge over an input model",
        lambda i: run("merge", i.recipe(i.local_family()), str(i.tmp / "models" / "model_a"), "--overwrite"),
        "output directory {tmp}/models/model_a is the input model",
    ),
    (
        "merge over the folder that holds the inputs",
        lambda i: run("merge", i.recipe(i.local_family()), str(i.tmp / "models"), "--overwrite"),
        "output directory {tmp}/models contains the input model",
    ),
    (
        "merge into an input model",
        lambda i: run("merge", i.recipe(i.local_family()), str(i.tmp / "models" / "base" / "merged")),
        "output directory {tmp}/models/base/merged lies inside the input model",
    ),
    (
        "merge over an input through a symlink",
        lambda i: run("merge", i.recipe(f := i.local_family()), i.link_to(f["model_a"]), "--overwrite"),
        "output directory {tmp}/link is the input model",
    ),
    (
        "merge over the recipe's folder",
        lambda i: run("merge", i.recipe(), str(i.tmp), "--overwrite"),
        "output directory {tmp} contains the recipe file ({tmp}/recipe.yaml)",
    ),
    (
        "export over an input model",
        lambda i: run("export", str(i.request.getfixturevalue("failing_study")), str(i.family["model_a"]), "--overwrite"),
        "is the input model",
    ),
    (
        "export over the folder of the study file and its database",
        lambda i: run("export", str(study := i.request.getfixturevalue("failing_study")), str(study.parent), "--overwrite"),
        "contains the study file",
    ),
    (
        "export over the study's task folder",
        lambda i: run("export", str(i.request.getfixturevalue("failing_study")), str(i.tasks), "--overwrite"),
        "is the task folder {tasks} (evaluation.include_paths)",
    ),
    # Numbers that would put NaN or inf into the weights.
    (
        "NaN in a gradient",
        lambda i: run("merge", i.recipe(parameters={"t": [0, float("nan"), 1]}), str(i.tmp / "out")),
        "parameters.t: nan is not valid: not a finite number",
    ),
    (
        "linear weights that sum to 0",
        lambda i: run("merge", linear_recipe(i, (1, -1)), str(i.tmp / "out")),
        "tensor model.embed_tokens.weight: parameter 'weight': the weights [1.0, -1.0] sum to 0",
    ),
    (
        "merged weights not finite",
        lambda i: run("merge", i.recipe({**i.family, "model_a": nan_copy(i.family["model_a"], i.tmp)}), str(i.tmp / "out")),
        "merged weights are not finite: NaN or inf in model.layers.0.mlp.down_proj.weight",
    ),
    (
        "quantized (int8) weights",
        lambda i: run("merge", i.recipe(i.model_copy("model_a", quantized)), str(i.tmp / "out")),
        "{tmp}/damaged: tensor model.embed_tokens.weight is int8, not floating point; quantized checkpoints are not supported",
    ),
    # Damaged or strange files: one message, not a traceback.
    (
        "config.json that isn't an object",
        lambda i: run("merge", i.recipe(i.model_copy("model_a", lambda f: f.write_text("[1, 2]"), "config.json")), str(i.tmp / "out")),
        "{tmp}/damaged/config.json holds a JSON list, not an object",
    ),
    (
        "safetensors shape that disagrees with its bytes",
        lambda i: run("merge", i.recipe(i.model_copy("model_a", edit_header(lambda h: first_tensor(h)["shape"].append(2)))), str(i.tmp / "out")),
        "is corrupt or truncated (tensor model.embed_tokens.weight: shape",
    ),
    (
        "safetensors byte range outside the file",
        lambda i: run("merge", i.recipe(i.model_copy("model_a", edit_header(lambda h: first_tensor(h).update(data_offsets=[0, 10**12])))), str(i.tmp / "out")),
        "is corrupt or truncated (tensor model.embed_tokens.weight ends at byte",
    ),
    (
        "safetensors header of 1 TiB",
        lambda i: run("merge", i.recipe(i.model_copy("model_a", huge_header)), str(i.tmp / "out")),
        "is corrupt or truncated (header of 1099511627776 bytes, over the 100000000",
    ),
    (
        "safetensors header that isn't an object",
        lambda i: run("merge", i.recipe(i.model_copy("model_a", raw_header(b"[1, 2]  "))), str(i.tmp / "out")),
        "is corrupt or truncated (header is not a JSON object)",
    ),
    (
        "safetensors dtype this tool doesn't read (fp8)",
        lambda i: run("merge", i.recipe(i.model_copy("model_a", edit_header(lambda h: first_tensor(h).update(dtype="F8_E4M3")))), str(i.tmp / "out")),
        "tensor model.embed_tokens.weight in {tmp}/damaged/model-00001-of-00008.safetensors has dtype F8_E4M3",
    ),
    (
        "shard index that isn't an object",
        lambda i: run("merge", i.recipe(i.model_copy("model_a", lambda f: f.write_text("[]"), "*.index.json")), str(i.tmp / "out")),
        "model.safetensors.index.json holds a JSON list, not an object",
    ),
    (
        "shard index pointing outside the model",
        lambda i: run(
            "merge",
            i.recipe(i.model_copy("model_a", lambda f: f.write_text(json.dumps({"weight_map": {"x": "../../etc/passwd"}})), "*.index.json")),
            str(i.tmp / "out"),
        ),
        "weight_map must map tensor names to shard file names in {tmp}/damaged",
    ),
    (
        "tokenizer_config.json that isn't JSON, with chat_template: auto",
        lambda i: run(
            "merge",
            i.recipe(i.model_copy("model_a", lambda f: f.write_text("{oops"), "tokenizer_config.json"), chat_template="auto"),
            str(i.tmp / "out"),
        ),
        "cannot read {tmp}/damaged/tokenizer_config.json",
    ),
    (
        "pickled weights that aren't a state dict",
        lambda i: run("merge", i.recipe(i.pickled_non_state_dict()), str(i.tmp / "out"), "--allow-pickle"),
        "pytorch_model.bin does not hold a state dict",
    ),
    # A typo in the recipe or on the command line.
    (
        "stage name that is a path",
        lambda i: run("merge", i.recipe(name="../victim"), str(i.tmp / "out")),
        "name: a stage name must be a plain name, not a path: '../victim'",
    ),
    (
        "quoted number mergekit cannot merge",
        lambda i: run("merge", i.recipe(merge_method="dare_ties", parameters={"weight": 1, "density": "-0.5"}), str(i.tmp / "out")),
        "parameters.density: '-0.5' is below 0.0: dare_ties cannot merge it",
    ),
    ("shard size without a unit", lambda i: run("merge", i.recipe(), str(i.tmp / "out"), "--shard-size", "100"), "--shard-size 100: 100 bytes would put every tensor in a shard of its own; give a unit (100MB, 100GB), or 100B"),
    ("shard size inf", lambda i: run("merge", i.recipe(), str(i.tmp / "out"), "--shard-size", "inf"), "--shard-size: must be a finite"),
    (
        "merge on a device this machine lacks",
        lambda i: run("merge", i.recipe(), str(i.tmp / "out"), "--device", "cuda:99"),
        "device cuda:99: ",
    ),
    (
        "merge on the meta device",
        lambda i: run("merge", i.recipe(), str(i.tmp / "out"), "--device", "meta"),
        "device meta: mergetune runs on cpu or cuda, not meta",
    ),
    (
        "merge onto a file",
        lambda i: run("merge", i.recipe(), i.file_at("notes.txt")),
        "output {tmp}/notes.txt is not a directory (a file or a link)",
    ),
    (
        "demo into a file",
        lambda i: run("demo", "--out-dir", i.file_at("notes.txt")),
        "--out-dir {tmp}/notes.txt: {tmp}/notes.txt is a file, not a directory",
    ),
    (
        "--overwrite onto a file",
        lambda i: run("merge", i.recipe(), i.file_at("notes.txt"), "--overwrite"),
        "output {tmp}/notes.txt is not a directory",
    ),
    (
        "export of a trial that doesn't exist",
        lambda i: run("export", str(i.request.getfixturevalue("failing_study")), str(i.tmp / "out"), "--trial", "99"),
        "no completed trial 99",
    ),
    (
        "export of a method the study doesn't search",
        lambda i: run("export", str(i.request.getfixturevalue("failing_study")), str(i.tmp / "out"), "--method", "bogus"),
        "--method bogus: not a method of study",
    ),
    # The search and scoring commands (issue #11's second half).
    (
        "storage URL with a port that isn't a number",
        lambda i: run("study", "run", i.study(), "--storage", f"postgresql://mergetune:{PASSWORD}@127.0.0.1:notaport/db"),
        "study storage postgresql://mergetune:***@127.0.0.1:notaport/db: not a valid database URL",
    ),
    (
        "eval of a directory with config and tokenizer but no weights",
        lambda i: run("eval", i.weightless_model(), "--tasks", "demo_arithmetic", "--include-path", str(i.tasks)),
        "model directory {tmp}/weightless has no weights (*.safetensors or pytorch_model*.bin files)",
    ),
    ("--n-trials -2", lambda i: run("study", "run", i.study(), "--n-trials", "-2"), "--n-trials: must be a finite number of at least 1, got -2"),
    ("--n-trials 0", lambda i: run("study", "run", i.study(), "--n-trials", "0"), "--n-trials: must be a finite number of at least 1, got 0"),
    ("--timeout 0", lambda i: run("study", "run", i.study(), "--timeout", "0"), "--timeout: must be a finite number of at least 1, got 0"),
    ("--timeout inf", lambda i: run("study", "run", i.study(), "--timeout", "inf"), "--timeout: must be a finite number of at least 1, got inf"),
    ("--max-failures 0", lambda i: run("study", "run", i.study(), "--max-failures", "0"), "--max-failures: must be a finite number of at least 1"),
    ("study: infinite timeout", lambda i: run("study", "run", i.study(budget={"timeout": float("inf")})), "budget.timeout: Input should be a finite number"),
    (
        "study: data_dir missing a split file",
        lambda i: run("study", "run", i.evaluation(data_dir=i.data_dir_missing_a_split(), tasks=["arc_easy"])),
        "{tmp}/study.yaml: evaluation.data_dir {tmp}/data: task 'arc_easy' needs its 'validation' split, "
        "{tmp}/data/arc_easy/validation.jsonl, which does not exist",
    ),
    (
        "eval: --data-dir missing a split file",
        lambda i: run("eval", str(i.family["model_a"]), "--tasks", "arc_easy", "--data-dir", i.data_dir_missing_a_split()),
        "--data-dir {tmp}/data: task 'arc_easy' needs its 'validation' split, {tmp}/data/arc_easy/validation.jsonl",
    ),
    (
        "eval: --data-dir without a folder for one of the suite's tasks",
        lambda i: run("eval", str(i.family["model_a"]), "--suite", "leaderboard", "--data-dir", i.data_dir_with_arc_easy_only()),
        "--data-dir {tmp}/data: has no data for task 'arc_challenge' (a folder {tmp}/data/arc_challenge with train.jsonl, "
        "validation.jsonl, test.jsonl); add it, or name only tasks it has",
    ),
    (
        "study: data_dir without a folder for one of its tasks",
        lambda i: run("study", "run", i.evaluation(data_dir=i.data_dir_with_arc_easy_only(), tasks=["arc_easy", "winogrande"])),
        "{tmp}/study.yaml: evaluation.data_dir {tmp}/data: has no data for task 'winogrande' (a folder {tmp}/data/winogrande",
    ),
    (
        "study: data_dir that is a file",
        lambda i: run("study", "run", i.evaluation(data_dir=i.file_at("notes.txt"))),
        "{tmp}/study.yaml: evaluation.data_dir {tmp}/notes.txt does not exist or is not a directory",
    ),
    (
        "study: include path missing",
        lambda i: run("study", "run", i.evaluation(include_paths=["no-tasks-here"])),
        "task directory {tmp}/no-tasks-here ({tmp}/study.yaml: evaluation.include_paths) does not exist",
    ),
    (
        "task YAML with a syntax error in an include path",
        lambda i: run("eval", str(i.family["model_a"]), "--tasks", "demo_broken", "--include-path", i.task_dir_with_a_broken_yaml()),
        "unknown task 'demo_broken': not an lm-eval task, group or tag, nor in the include paths; lm-eval skipped task "
        "files it could not read: {tmp}/tasks/broken.yaml: ScannerError: mapping values are not allowed",
    ),
    (
        "data_dir JSONL with a line that isn't JSON",
        lambda i: run("eval", str(i.family["model_a"]), "--tasks", "arc_easy", "--data-dir", i.data_dir_with_a_garbage_line()),
        "{tmp}/data/arc_easy/train.jsonl line 2: not a JSON object in this dataset's schema",
    ),
    ("eval --limit 0", lambda i: run("eval", str(i.family["model_a"]), "--tasks", "demo_arithmetic", "--limit", "0"), "--limit: must be at least 1, got 0"),
    (
        "eval --json in a missing folder",
        lambda i: run("eval", str(i.family["model_a"]), "--tasks", "demo_arithmetic", "--json", str(i.tmp / "out" / "scores.json")),
        "--json {tmp}/out/scores.json: directory {tmp}/out does not exist",
    ),
    ("study file that is a directory", lambda i: run("study", "run", str(i.tmp)), "cannot read study file {tmp}: [Errno 21] Is a directory"),
    (
        "study file that is binary (a checkpoint shard)",
        lambda i: run("study", "run", str(sorted(i.family["model_a"].glob("*.safetensors"))[0])),
        "cannot read study file {family}/model_a/model-00001-of-",
    ),
    ("study file that is huge", lambda i: run("study", "run", i.sparse_file("huge.yaml", 2**31)), "{tmp}/huge.yaml is 2,147,483,648 bytes; a study file is a few KB"),
    ("study file with a YAML alias bomb", lambda i: run("study", "run", i.alias_bomb()), "{tmp}/bomb.yaml: name: Input should be a valid string"),
    (
        "study storage in a read-only folder",
        lambda i: run("study", "run", i.study(storage=f"sqlite:///{i.read_only_folder()}/study.db")),
        "cannot create {tmp}/read-only/study.db: directory {tmp}/read-only is not writable",
    ),
    ("storage file that isn't a database", lambda i: run("leaderboard", i.study(), "--storage", f"sqlite:///{i.file_at('notes.db')}"), "file is not a database"),
    (
        "leaderboard of a storage file that doesn't exist (a typo): not created",
        lambda i: run("leaderboard", i.study(), "--storage", f"sqlite:///{i.tmp}/out"),
        "study storage sqlite:///{tmp}/out: {tmp}/out does not exist; no trials were stored there",
    ),
    (
        "leaderboard of a storage holding no study of that name",
        lambda i: run("leaderboard", i.study(name="other"), "--storage", f"sqlite:///{Path(stored_study(i)).parent}/tiny.db"),
        "study other is not in sqlite:///",
    ),
    (
        "leaderboard --json in a missing folder",
        lambda i: run("leaderboard", stored_study(i), "--json", str(i.tmp / "out" / "board.json")),
        "--json {tmp}/out/board.json: directory {tmp}/out does not exist",
    ),
    (
        "leaderboard --csv in a folder that is a file",
        lambda i: run("leaderboard", stored_study(i), "--csv", i.file_at("notes.txt") + "/board.csv"),
        "--csv {tmp}/notes.txt/board.csv: directory {tmp}/notes.txt is a file, not a directory",
    ),
    ("leaderboard --top 0", lambda i: run("leaderboard", stored_study(i), "--top", "0"), "--top: must be a finite number of at least 1, got 0"),
    (
        "report directory that is a file",
        lambda i: run("report", stored_study(i), i.file_at("notes.txt")),
        "report directory {tmp}/notes.txt: {tmp}/notes.txt is a file, not a directory",
    ),
    (
        "export to a path whose parent is a file",
        lambda i: run("export", stored_study(i), i.file_at("notes.txt") + "/out"),
        "output directory {tmp}/notes.txt/out: {tmp}/notes.txt is a file, not a directory",
    ),
]


@pytest.mark.parametrize("case, make, message", HOSTILE, ids=[case for case, _, _ in HOSTILE])
def test_hostile_input_gives_one_clear_message(case, make, message, family_f32, tiny_tasks, tmp_path, monkeypatch, request):
    inputs = Inputs(tmp_path, family_f32, tiny_tasks, monkeypatch, request)
    args = make(inputs)
    before = checksums(tmp_path, *family_f32.values())
    result = runner.invoke(app, args)
    assert_one_message(result, message.format(tmp=tmp_path, family=family_f32["model_a"].parent, tasks=tiny_tasks))
    assert PASSWORD not in result.output
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*.partial-*"))
    after = checksums(tmp_path, *family_f32.values())
    assert {path: after.get(path) for path in before} == before  # every input untouched
    assert sorted(after.keys() - before.keys()) == []  # and nothing new: no output, no empty study storage


def checksums(*roots: Path) -> dict[Path, tuple]:
    """Every file under `roots` (links not followed): size, and content hash unless huge (a sparse test file)."""
    sums = {}
    for root in roots:
        for directory, _, files in os.walk(root):
            for name in files:
                path = Path(directory, name)
                size = path.lstat().st_size
                digest = hashlib.sha256(path.read_bytes()).hexdigest() if size < 2**26 and not path.is_symlink() else None
                sums[path] = (size, digest)
    return sums


@pytest.mark.parametrize(
    "text, url",
    [
        ("postgresql://u:s3cret@db/x", "postgresql://u:s3cret@db/x"),
        ("postgresql://u:pa/ss@w0rd@db:5432/x", "postgresql://u:pa/ss@w0rd@db:5432/x"),  # '/' and '@' in the password
        ("redis://:s3cret@cache:6379", "redis://:s3cret@cache:6379"),  # no user name
        ("could not connect with password=s3cret host=db", "postgresql://u:s3cret@db/x"),  # libpq keyword form
        ("the driver said 's3cret' was refused", "postgresql://u:s3cret@db/x"),  # the bare password
        ("postgresql://u:s%40cret99@db/x failed; s@cret99 refused", "postgresql://u:s%40cret99@db/x"),  # %-encoded
    ],
)
def test_passwords_are_masked_wherever_they_appear(text, url):
    masked = redact(text, url)
    assert "s3cret" not in masked and "pa/ss" not in masked and "cret99" not in masked


def board_with_hostile_names() -> tuple[Leaderboard, Row]:
    hostile = "<script>alert(1)</script>|`rm -rf`"
    summary = Summary({hostile: TaskSummary(0.5, 0.1, 10, "acc", None)}, 0.5, 0.1)
    row = Row("slerp", 0, hostile, summary, summary, "merge_method: slerp\n", 0, rank=1, method_rank=1)
    return Leaderboard("tiny", [row]), row


def test_text_from_inputs_is_escaped_in_score_tables_and_html_reports():
    hostile = "<script>alert(1)</script>|`rm -rf`"
    summary = Summary({hostile: TaskSummary(0.5, 0.1, 10, "acc", None)}, 0.5, 0.1)
    row = Row("slerp", 0, hostile, summary, summary, "merge_method: slerp\n", 0, rank=1, method_rank=1)
    board = Leaderboard("tiny", [row])
    card, page = score_table(board, row), _html_table(board)
    for rendered in (card, page):
        assert "<script>" not in rendered and "&lt;script&gt;" in rendered
    assert "\\|" in card and "\\`rm -rf\\`" in card  # a task name can't open a table cell or a code span


def test_model_names_cannot_rewrite_the_model_cards_front_matter(family_f32):
    recipe = recipe_from_dict(
        {"merge_method": "slerp", "base_model": str(family_f32["base"]), "parameters": {"t": 0.5},
         "models": [{"model": str(family_f32["base"])}, {"model": str(family_f32["model_a"])}]}
    )
    plan = plan_merge(recipe, {model: open_source(model) for model in recipe.referenced_models()})
    hostile = recipe.model_copy(update={"base_model": "org/x\nlicense: evil <b>"})
    card = model_card(hostile, plan, "merge_method: slerp", None)
    front_matter = card.split("---")[1]
    assert "license: evil" not in front_matter and "<b>" not in card


def study_copy(stored: Path, directory: Path) -> Path:
    """A copy of a stored study (its file and the SQLite database beside it) that a test may put at risk."""
    return Path(shutil.copytree(stored.parent, directory / "study")) / stored.name


def assert_one_message(result, message: str) -> None:
    """Exit 2 with `message`, said once, and no traceback."""
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert result.output.count("error: ") == 1 and "Traceback" not in result.output


@pytest.mark.parametrize("option", ["--json", "--csv"])
@pytest.mark.parametrize("what, name", [("study file", "study.yaml"), ("study storage", "tiny.db")])
def test_leaderboard_refuses_to_write_over_the_study_file_or_its_storage(option, what, name, failing_study, tmp_path):
    study = study_copy(failing_study, tmp_path)
    before = checksums(study.parent)
    result = runner.invoke(app, ["leaderboard", str(study), option, str(study.parent / name)])
    assert_one_message(result, f"{option} {study.parent / name}: is the {what}; writing there would destroy it")
    assert checksums(study.parent) == before
    assert sum(t.state in COUNTED for t in stored_trials(study)) == N


def test_leaderboard_and_report_leave_the_task_folder_and_someone_else_s_page_alone(failing_study, tiny_tasks, tmp_path):
    study = study_copy(failing_study, tmp_path)
    tasks_before = checksums(tiny_tasks)
    inside = tiny_tasks / "board.json"
    result = runner.invoke(app, ["leaderboard", str(study), "--json", str(inside)])
    assert_one_message(result, f"--json {inside}: is inside the task folder {tiny_tasks} (evaluation.include_paths)")
    result = runner.invoke(app, ["report", str(study), str(tiny_tasks)])
    assert_one_message(result, f"report directory {tiny_tasks}: is the task folder {tiny_tasks}")
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("<html>mine</html>")
    result = runner.invoke(app, ["report", str(study), str(site)])
    assert_one_message(result, f"report directory {site}: holds an index.html that is not a mergetune report")
    assert [p.name for p in site.iterdir()] == ["index.html"] and (site / "index.html").read_text() == "<html>mine</html>"
    assert checksums(tiny_tasks) == tasks_before
    for _ in range(2):  # a report drawn again replaces the earlier one
        result = runner.invoke(app, ["report", str(study), str(tmp_path / "report")])
        assert result.exit_code == 0, result.output



def test_no_output_may_land_in_an_input_model_or_on_another_output(failing_study, family_f32, tiny_tasks, tmp_path):
    models_before = {name: checksums(path) for name, path in family_f32.items()}
    config = family_f32["model_b"] / "config.json"
    result = runner.invoke(app, ["leaderboard", str(failing_study), "--json", str(config)])
    assert_one_message(result, f"--json {config}: is inside the model {family_f32['model_b']} (models[1])")
    result = runner.invoke(app, ["report", str(failing_study), str(family_f32["model_a"])])
    assert_one_message(result, f"report directory {family_f32['model_a']}: is the model {family_f32['model_a']} (models[0])")
    same = tmp_path / "board.out"
    result = runner.invoke(app, ["leaderboard", str(failing_study), "--json", str(same), "--csv", str(same)])
    assert_one_message(result, f"--csv {same}: is also the --json output; give each its own file")
    assert not same.exists()
    model = family_f32["model_a"]
    for output, what in ((model / "config.json", f"model directory {model}"), (tiny_tasks / "x.json", "task folder")):
        result = runner.invoke(
            app, ["eval", str(model), "--tasks", "demo_arithmetic", "--include-path", str(tiny_tasks), "--json", str(output)]
        )
        assert_one_message(result, f"--json {output}: is inside the {what}")
    assert {name: checksums(path) for name, path in family_f32.items()} == models_before


def _truncated(model: Path) -> None:
    shard = sorted(model.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])


def _bad_config(model: Path) -> None:
    (model / "config.json").write_text("{not json")


def _no_tokenizer(model: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).unlink(missing_ok=True)


@pytest.mark.parametrize(
    "damage, args, message",
    [
        (None, ["--device", "tpu"], "device 'tpu': not a device name like cpu, cuda or cuda:1"),
        (None, ["--device", "meta"], "device meta: mergetune runs on cpu or cuda, not meta"),
        (None, ["--device", "cuda:7"], "device cuda:7: "),
        (_truncated, [], "transformers cannot load it: "),
        (_bad_config, [], "transformers cannot load it: "),
        (_no_tokenizer, [], "transformers cannot load it: "),
    ],
    ids=["device tpu", "device meta", "device cuda:7", "truncated weights", "config not JSON", "no tokenizer"],
)
def test_eval_of_a_broken_checkpoint_or_a_missing_device_gives_one_message(damage, args, message, family_f32, tiny_tasks, tmp_path):
    model = Path(shutil.copytree(family_f32["model_a"], tmp_path / "model"))
    if damage is not None:
        damage(model)
    result = runner.invoke(
        app, ["eval", str(model), "--tasks", "demo_arithmetic", "--include-path", str(tiny_tasks), "--limit", "2", *args]
    )
    assert_one_message(result, message)
    if damage is not None:
        assert f"model directory {model}: transformers cannot load it" in result.output

def test_leaderboard_refuses_to_replace_a_special_file_with_a_regular_one(failing_study, tmp_path):
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    result = runner.invoke(app, ["leaderboard", str(failing_study), "--csv", str(pipe)])
    assert_one_message(result, f"--csv {pipe}: is not a regular file (a device, a pipe or a socket)")
    assert stat.S_ISFIFO(pipe.lstat().st_mode) and not list(tmp_path.glob(".*.partial-*"))


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc, a folder nobody can create files in")
@pytest.mark.parametrize(
    "args, message",
    [
        (["leaderboard", "{study}", "--json", "/proc/board.json"], "--json /proc/board.json: cannot write it: "),
        (["leaderboard", "{study}", "--csv", "/proc/board.csv"], "--csv /proc/board.csv: cannot write it: "),
        (["report", "{study}", "/proc/report"], "cannot write /proc/report: "),
    ],
    ids=["leaderboard --json", "leaderboard --csv", "report"],
)
def test_an_output_in_a_folder_that_cannot_be_written_gives_one_message(args, message, failing_study):
    result = runner.invoke(app, [arg.format(study=failing_study) for arg in args])
    assert_one_message(result, message)
    assert "; nothing was written there" in result.output
