"""bench/gpu_check.py, the script a GPU machine runs, runs here at tiny sizes on the CPU so it cannot rot."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


def test_the_gpu_check_passes_at_tiny_sizes_on_the_cpu(capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    assert gpu_check.main(["--tiny", "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    for method in ("slerp", "dare_ties"):
        assert f"{method}: in-memory == disk merge on cpu, bit for bit" in table
        assert f"{method}: same recipe and seed again later, identical" in table
    assert "hf: another candidate, another score" in table and "NO" not in table.split()
