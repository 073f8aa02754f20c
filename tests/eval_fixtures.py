"""Fixtures for the evaluator tests: tiny checkpoints, local data, a toy task, a completions server.

tests/conftest.py belongs to the whole suite; test_eval_* modules load this module as a
plugin (`pytest_plugins`), so each session fixture exists once, and import its constants.
PYTEST_DONT_REWRITE: imported before pytest registers it as a plugin; it asserts nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergetune.demo.tiny import build_family
from mergetune.eval.local_data import local_task_dir

SHARED_BENCHMARKS = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"

# A task in the shape a search demo ships: its own YAML, local JSONL data, words the
# tiny tokenizer knows (so answer choices are distinct tokens, not all <unk>).
_CAPITALS = [
    ("france", "paris"), ("germany", "berlin"), ("italy", "rome"), ("spain", "madrid"),
    ("japan", "tokyo"), ("china", "beijing"), ("egypt", "cairo"), ("canada", "ottawa"),
    ("peru", "lima"), ("norway", "oslo"), ("sweden", "stockholm"), ("poland", "warsaw"),
]
TOY_TASK = "toy_capitals"
TOY_GENERATE_TASK = "toy_generate"
#: The batch size of the reference `lm_eval` runs (and of the evaluators compared with them).
LM_EVAL_BATCH_SIZE = 4


@pytest.fixture(scope="session")
def benchmarks_dir() -> Path:
    """The shared copies of the leaderboard datasets (../shared/benchmarks)."""
    if not (SHARED_BENCHMARKS / "README.md").is_file():
        pytest.skip(f"local benchmark data not found at {SHARED_BENCHMARKS} (needed for lm-eval's real tasks)")
    return SHARED_BENCHMARKS


def run_lm_eval(model_dir: Path, data_dir: Path, tasks, doc_ids, num_fewshot: int, out: Path) -> dict:
    """`lm_eval --model hf` on exactly these documents; returns its results JSON and per-document samples."""
    command = [
        sys.executable, "-m", "lm_eval",
        "--model", "hf", "--model_args", f"pretrained={model_dir}", "--device", "cpu",
        "--tasks", ",".join(tasks),
        "--include_path", str(local_task_dir(data_dir)),
        "--samples", json.dumps(doc_ids),
        "--num_fewshot", str(num_fewshot),
        "--batch_size", str(LM_EVAL_BATCH_SIZE),
        "--output_path", str(out), "--log_samples",
    ]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    if completed.returncode != 0:  # pytest.fail, not assert: this module is not rewritten (above)
        pytest.fail(f"lm_eval exited {completed.returncode}:\n{completed.stderr[-4000:]}")
    results_file = max(out.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    samples = {}
    for path in out.rglob("samples_*.jsonl"):
        task = path.name.removeprefix("samples_").rsplit("_", 1)[0]
        samples[task] = [json.loads(line) for line in path.read_text().splitlines()]
    return {"results": json.loads(results_file.read_text())["results"], "samples": samples}


@pytest.fixture(scope="session")
def lm_eval_cli(tmp_path_factory):
    """`run_lm_eval(model_dir, data_dir, tasks, doc_ids, num_fewshot)`, run once per distinct call in a session: the
    parity tests of lm-eval's scoring path and of the shared-prefix path compare against the same reference run."""
    runs: dict[tuple, dict] = {}

    def run(model_dir: Path, data_dir: Path, tasks, doc_ids, num_fewshot: int) -> dict:
        key = (str(model_dir), str(data_dir), tuple(tasks), json.dumps(doc_ids, sort_keys=True), num_fewshot)
        if key not in runs:
            runs[key] = run_lm_eval(model_dir, data_dir, tasks, doc_ids, num_fewshot, tmp_path_factory.mktemp("lm_eval"))
        return runs[key]

    return run


@pytest.fixture(scope="session")
def eval_models(tmp_path_factory) -> dict[str, Path]:
    """Two tiny float32 Llama checkpoints: base and a perturbed relative."""
    return build_family(tmp_path_factory.mktemp("eval-models"), names=("base", "other"))


@pytest.fixture(scope="session")
def toy_task_dir(tmp_path_factory) -> Path:
    """A user task directory: a multiple-choice YAML reading a local JSONL file, and a generation task."""
    folder = tmp_path_factory.mktemp("toy-tasks")
    cities = [city for _, city in _CAPITALS]
    rows = []
    for index, (country, city) in enumerate(_CAPITALS):
        choices = [city] + [cities[(index + k) % len(cities)] for k in (3, 5, 7)]
        rows.append({"country": country, "choices": sorted(choices), "answer": sorted(choices).index(city)})
    (folder / "capitals.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "toy_capitals.yaml").write_text(
        f"task: {TOY_TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: {json.dumps(str(folder / 'capitals.jsonl'))}}}}}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "question : what is the capital of {{country}} ? answer :"\n'
        "doc_to_choice: choices\n"
        "doc_to_target: answer\n"
        "metric_list:\n"
        "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n"
    )
    # A generation task next to it, which the evaluator must refuse by name.
    (folder / "toy_generate.yaml").write_text(
        f"task: {TOY_GENERATE_TASK}\ndataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: {json.dumps(str(folder / 'capitals.jsonl'))}}}}}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: country\ndoc_to_target: answer\n"
        "generation_kwargs: {until: ['.']}\n"
        "metric_list:\n  - {metric: exact_match, aggregation: mean, higher_is_better: true}\n"
    )
    return folder


class _CompletionsHandler(BaseHTTPRequestHandler):
    """POST /v1/completions with echo + logprobs, computed by a transformers model (OpenAI shape)."""

    model: torch.nn.Module
    tokenizer = None
    lock = threading.Lock()
    requests_served = 0

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_POST(self) -> None:
        if self.path.rstrip("/") != "/v1/completions":
            self.send_error(404)
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if not (body.get("echo") and body.get("logprobs") and body.get("max_tokens") == 1):
            self.send_error(400, "this test server only scores prompts: echo, logprobs and max_tokens=1")
            return
        prompts = body["prompt"]
        if not (isinstance(prompts, list) and prompts and isinstance(prompts[0], list)):
            prompts = [prompts]
        prompts = [self.tokenizer.encode(p, add_special_tokens=False) if isinstance(p, str) else p for p in prompts]
        with self.lock:
            choices = [self._choice(index, tokens) for index, tokens in enumerate(prompts)]
            type(self).requests_served += 1
        payload = json.dumps({"object": "text_completion", "model": body.get("model"), "choices": choices}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _choice(self, index: int, tokens: list[int]) -> dict:
        with torch.no_grad():
            logprobs = torch.log_softmax(self.model(torch.tensor([tokens])).logits[0].float(), dim=-1)
        generated = int(logprobs[-1].argmax())
        sequence = tokens + [generated]
        token_logprobs: list = [None]
        top_logprobs: list = [None]
        for position in range(1, len(sequence)):
            row = logprobs[position - 1]
            best = int(row.argmax())
            token_logprobs.append(float(row[sequence[position]]))
            top_logprobs.append({self.tokenizer.convert_ids_to_tokens(best): float(row[best])})
        return {
            "index": index,
            "text": self.tokenizer.decode(sequence),
            "logprobs": {
                "tokens": self.tokenizer.convert_ids_to_tokens(sequence),
                "token_logprobs": token_logprobs,
                "top_logprobs": top_logprobs,
            },
            "finish_reason": "length",
        }


@pytest.fixture
def completions_server(eval_models) -> Iterator[tuple[str, type[_CompletionsHandler]]]:
    """An OpenAI-compatible completions server on 127.0.0.1 (ephemeral port) serving the base model.

    Yields (base URL, handler class). It stops when the test ends, or after 120 s
    whatever happens, so a hung test cannot leave it running.
    """
    handler = type("Handler", (_CompletionsHandler,), {})
    handler.model = AutoModelForCausalLM.from_pretrained(eval_models["base"]).eval()
    handler.tokenizer = AutoTokenizer.from_pretrained(eval_models["base"])
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    watchdog = threading.Timer(120, server.shutdown)
    watchdog.daemon = True
    watchdog.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", handler
    finally:
        watchdog.cancel()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
