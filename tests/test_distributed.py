"""The IFT objective under the wrappers users train with, on CPU: FSDP2 (accelerate's layout,
torchrun + gloo) and DeepSpeed ZeRO-3 (`DS_ACCELERATOR=cpu`), 2 processes each.

Every step gives the ranks data that changes how much work the objective has to do (a batch
the model predicts perfectly, a batch with no trained token, different numbers of head chunks);
the ranks must still issue the same collectives, and the gathered gradients must equal one
process on the whole batch. `TORCH_DISTRIBUTED_DEBUG=DETAIL` turns a collective mismatch
(a hang on NCCL) into an error naming both ranks' collectives.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "dist_grads.py"
# fp32 everywhere: only the summation order differs from one process (|grad| up to ~0.5 here).
FP32_ATOL = 1e-5


def torchrun(tmp_path: Path, *args: str, env_extra: dict | None = None) -> dict:
    """Run dist_grads.py on 2 processes; returns rank 0's report (fails with the ranks' errors)."""
    out = tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TORCH_DISTRIBUTED_DEBUG": "DETAIL", **(env_extra or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(SCRIPT), *args, "--out", str(out)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=400)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if "Error" in line][-6:]
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n" + "\n".join(errors)
                             + "\n--- stderr tail ---\n" + proc.stderr[-4000:])
    return json.loads(out.read_text())


def check_report(report: dict, atol: float) -> None:
    steps = {s["name"]: s for s in report["steps"]}
    assert len(steps) == 4, steps.keys()
    for name, s in steps.items():
        assert s["grad_shapes_match"], name
        assert s["max_abs_grad"] > 1e-3, name  # the comparison is not between zeros
        assert s["max_abs_diff"] <= atol, (name, s["worst_param"], s["max_abs_diff"])
    # The data did what the step names say: intuition accuracy 1 where the model predicts the
    # batch, no trained sequence on the empty rank, more head chunks on one rank than the other.
    assert steps["normal+perfect"]["intuition_accuracy"][1] == 1.0
    assert steps["normal+perfect"]["intuition_accuracy"][0] < 1.0
    assert steps["perfect+no_trained_token"]["intuition_accuracy"][0] == 1.0
    assert steps["perfect+no_trained_token"]["n_sequences"] == [2, 0]
    assert steps["no_trained_token+normal"]["n_sequences"] == [0, 2]
    assert steps["many_chunks+one_chunk"]["n_tokens"] == [30, 3]


@pytest.mark.slow
@pytest.mark.parametrize("variant", [
    [],
    ["--tied", "--intuition_embeddings", "detached"],
], ids=["untied", "tied-detached"])
def test_fsdp2_two_ranks_match_one_process(tmp_path, variant):
    report = torchrun(tmp_path, "--backend", "fsdp2", "--chunk", "4", *variant)
    check_report(report, FP32_ATOL)


needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed not installed (pip install 'iftune[deepspeed]')")


@pytest.mark.slow
@needs_deepspeed
def test_zero3_two_ranks_match_one_process(tmp_path):
    # --chunk 4: 30 trained positions on one rank (8 head chunks) against 3 on the other (1).
    report = torchrun(tmp_path, "--backend", "zero3", "--chunk", "4", "--intuition_embeddings", "detached",
                      env_extra={"DS_ACCELERATOR": "cpu"})
    check_report(report, FP32_ATOL)
