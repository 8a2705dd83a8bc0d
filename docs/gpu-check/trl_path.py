"""IFT on TRL's head against TRL's SFTTrainer, interleaved in one group, at batch 16 (both shapes).

Run once on an H200 as `OUT=DIR PYTHONPATH=src python docs/gpu-check/trl_path.py` (docs/performance.md).
"""

import json
import os
import warnings

import torch

from iftune.benchmarks.gpu_check import environment, run_group
from iftune.console import silence_libraries

out = {"environment": environment(torch.cuda), "groups": []}
print(out["environment"], flush=True)
with warnings.catch_warnings():
    silence_libraries()
    for shape in ("llama-3.2-1b", "qwen2.5-0.5b"):
        row = {
            "shape": shape,
            "group": "trl_path",
            "attention": "sdpa",
            "padding_free": False,
            "methods": ["trl_sft", "ift_trl_head"],
        }
        got = {**row, **run_group(row, torch.cuda, 5, 20, 16)}
        out["groups"].append(got)
        pm = got["per_method"]
        print(
            shape,
            {m: (round(v["step_s"], 4), round(v["step_peak_mb"])) for m, v in pm.items()},
            "ift_trl_head/trl_sft time",
            round(pm["ift_trl_head"]["step_s"] / pm["trl_sft"]["step_s"], 3),
            "memory",
            round(pm["ift_trl_head"]["step_peak_mb"] / pm["trl_sft"]["step_peak_mb"], 3),
            flush=True,
        )
        with open(os.path.join(os.environ["OUT"], "trl-path-b16.json"), "w") as f:
            json.dump(out, f, indent=2)
