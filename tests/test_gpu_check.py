"""``bench/gpu_check.sh --smoke``: every step of the GPU check at toy sizes on CPU, so the script cannot rot while
no GPU is lent (the figures it writes mean nothing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _gpu_check(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(["bash", "bench/gpu_check.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)


def test_the_gpu_check_smoke_runs_every_step_and_never_writes_over_the_gpu_results(tmp_path: Path) -> None:
    results = ROOT / "bench" / "RESULTS-gpu.md"
    before = results.read_bytes() if results.exists() else None
    refused = _gpu_check("--smoke", "--out", "bench")
    assert refused.returncode != 0 and "never writes over bench/RESULTS-gpu.md" in refused.stderr

    proc = _gpu_check("--smoke", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads((tmp_path / "gpu_check.json").read_text())
    assert out["size"] == "smoke" and out["device"] == "cpu"
    stage, train, demo = out["stage"], out["train"], out["demo"]
    assert stage["stage_views_per_s"] > 0 and stage["bare_views_per_s"] > 0 and stage["decode_workers"] >= 1
    assert train["cached_s_per_step"] > 0 and train["online_s_per_step"] > 0 and train["steps"] == 3
    run = demo["runs"]["this device"]
    assert demo["ok"] and run["returncode"] == 0 and 0 <= run["acc"]["teacher id_acc"] <= 1
    report = (tmp_path / "RESULTS-gpu.md").read_text()
    for row in ("stage / bare", "online / cached", "`e2kd demo --quick`, this device", "Device: cpu"):
        assert row in report
    assert (results.read_bytes() if results.exists() else None) == before
