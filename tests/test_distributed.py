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
import torch

from conftest import run_offline

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "dist_grads.py"
# fp32: only the summation order differs from one process (|grad| up to ~0.5 here).
FP32_ATOL = 1e-5
# bf16 mixed precision against the fp32 process: sharding may add little to bf16's own error,
# which one process in bf16 on the whole batch measures (2-6% of a gradient's norm here). FSDP2
# also runs the norms' elementwise ops and the gradient reduction in bf16, where autocast keeps
# fp32: at most 2x the single-process error, plus 1% of the norm. A lost rank, a doubled scale or
# a stale weight is off by 50% or more.
BF16_ERROR_FACTOR, BF16_ERROR_SLACK = 2.0, 0.01
BF16 = ("--mixed_precision", "bf16", "--init", "0.1")  # spread weights: bf16 keeps the greedy choices


def torchrun(tmp_path: Path, *args: str, env_extra: dict | None = None) -> dict:
    """Run dist_grads.py on 2 processes; returns rank 0's report (fails with the ranks' errors)."""
    out = tmp_path / "report.json"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TORCH_DISTRIBUTED_DEBUG": "DETAIL",
        **(env_extra or {}),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(SCRIPT),
        *args,
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=400)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if "Error" in line][-6:]
        raise AssertionError(
            f"{' '.join(args)} failed ({proc.returncode}):\n"
            + "\n".join(errors)
            + "\n--- stderr tail ---\n"
            + proc.stderr[-4000:]
        )
    return json.loads(out.read_text())


def check_report(report: dict, bf16: bool = False) -> None:
    steps = {s["name"]: s for s in report["steps"]}
    assert len(steps) == 4, steps.keys()
    for name, s in steps.items():
        assert s["grad_shapes_match"], name
        assert s["max_abs_grad"] > 1e-3, name  # the comparison is not between zeros
        if bf16:
            own = s["single_process_max_rel_diff"]
            assert 0 < own < 0.1, (name, own)
            assert s["max_rel_diff"] <= BF16_ERROR_FACTOR * own + BF16_ERROR_SLACK, (name, s["max_rel_diff"], own)
        else:
            assert s["max_abs_diff"] <= FP32_ATOL, (name, s["worst_param"], s["max_abs_diff"])
    # The data did what the step names say: intuition accuracy 1 where the model predicts the
    # batch, no trained sequence on the empty rank, more head chunks on one rank than the other.
    assert steps["normal+perfect"]["intuition_accuracy"][1] == 1.0
    assert steps["normal+perfect"]["intuition_accuracy"][0] < 1.0
    assert steps["perfect+no_trained_token"]["intuition_accuracy"][0] == 1.0
    assert steps["perfect+no_trained_token"]["n_sequences"] == [2, 0]
    assert steps["no_trained_token+normal"]["n_sequences"] == [0, 2]
    assert steps["many_chunks+one_chunk"]["n_tokens"] == [30, 3]


FSDP2_VARIANTS = {
    "untied": [],
    "moe-router-loss": ["--moe"],
    "tied-detached": ["--tied", "--intuition_embeddings", "detached"],
    "bf16-mixed-precision": list(BF16),
}
ZERO3_VARIANTS = {
    "detached": ["--intuition_embeddings", "detached"],
    "moe-router-loss": ["--moe"],
    "tied-bf16": ["--tied", *BF16],
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", FSDP2_VARIANTS)
def test_fsdp2_two_ranks_match_one_process(tmp_path, variant):
    """accelerate's FSDP2 layout; `--chunk 4` gives one rank 8 head chunks and the other 1."""
    options = FSDP2_VARIANTS[variant]
    check_report(torchrun(tmp_path, "--backend", "fsdp2", "--chunk", "4", *options), bf16="bf16" in options)


needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed (pip install 'iftune[deepspeed]')"
)


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("variant", ZERO3_VARIANTS)
def test_zero3_two_ranks_match_one_process(tmp_path, variant):
    """ZeRO-3 with parameters partitioned from construction; `--chunk 4` as above."""
    options = ZERO3_VARIANTS[variant]
    check_report(
        torchrun(tmp_path, "--backend", "zero3", "--chunk", "4", *options, env_extra={"DS_ACCELERATOR": "cpu"}),
        bf16="bf16" in options,
    )


# ---------------------------------------------------------------- the whole trainer under ZeRO-3

ZERO3_CONFIG = {
    "zero_optimization": {
        "stage": 3,
        "stage3_param_persistence_threshold": 0,  # partition every weight
        "stage3_gather_16bit_weights_on_model_save": True,
    },
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "zero_allow_untested_optimizer": True,
}


cli_run = run_offline


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("lm_head", ["iftune", "trl"])
def test_iftune_cli_under_zero3_matches_one_process(tmp_path, tiny_model_dir, chat_file, lm_head):
    """`iftune ift --deepspeed ds.json` on 2 processes (the HF Trainer's DeepSpeed integration:
    zero.Init loading, the engine's backward, IFTTrainer's loss scaling) makes the same SGD update
    as one process on the same 4 sequences, with several head chunks per rank on iftune's head,
    and on TRL's fused head (the default where training runs on CUDA)."""
    from safetensors.torch import load_file

    (tmp_path / "ds.json").write_text(json.dumps(ZERO3_CONFIG))
    launcher = tmp_path / "zero3.yaml"  # the shipped recipes/accelerate/zero3.yaml, its DeepSpeed part from ds.json
    launcher.write_text(
        json.dumps(
            {
                "distributed_type": "DEEPSPEED",
                "num_processes": 2,
                "num_machines": 1,
                "machine_rank": 0,
                "use_cpu": False,
                "compute_environment": "LOCAL_MACHINE",  # precision: ds.json (mixed_precision here is refused)
                "deepspeed_config": {"deepspeed_config_file": str(tmp_path / "ds.json"), "zero3_init_flag": True},
            }
        )
    )
    flags = {
        "model_name_or_path": tiny_model_dir,
        "dataset_name": chat_file,
        "use_cpu": "true",
        "report_to": "none",
        "disable_tqdm": "true",
        "max_steps": 1,
        "optim": "sgd",
        "learning_rate": 1.0,
        "lr_scheduler_type": "constant",
        "max_grad_norm": 0,
        "save_strategy": "no",
        "seed": 11,
        "head_chunk_size": 3,
        "intuition_embeddings": "detached",
        "bf16": "false",
        "lm_head": lm_head,
    }
    argv = [x for k, v in flags.items() for x in (f"--{k}", str(v))]
    one, two = tmp_path / "one", tmp_path / "two"
    cli_run(
        [
            sys.executable,
            "-m",
            "iftune.cli",
            "ift",
            *argv,
            "--output_dir",
            str(one),
            "--per_device_train_batch_size",
            "4",
        ]
    )
    cli_run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(launcher),
            "-m",
            "iftune.cli",
            "ift",
            *argv,
            "--output_dir",
            str(two),
            "--per_device_train_batch_size",
            "2",
        ],
        env_extra={"DS_ACCELERATOR": "cpu"},
    )
    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    assert set(a) == set(b) and any((a[k] - start[k]).abs().max() > 1e-3 for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)
