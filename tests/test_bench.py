"""`iftune bench`: the quick run's JSON, the two benchmark-only losses, the step relay."""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from iftune.benchmarks import trainers as bench  # noqa: E402
from iftune.errors import UserError  # noqa: E402
from iftune.objective import ift_loss  # noqa: E402

RATIO_KEYS = {"ift_over_sft_time", "ift_over_sft_memory", "ift_over_trl_sft_time",
              "ift_over_dpo_time_per_example", "ift_over_orpo_time_per_example",
              "naive_over_ift_memory", "naive_over_ift_time"}


def test_quick_run_writes_every_key(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--profile", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["ratios"]) == RATIO_KEYS
    for key, value in result["ratios"].items():
        assert math.isfinite(value) and value > 0, key
    assert set(result["methods"]) == set(bench.METHODS)
    for method, row in result["methods"].items():
        for key in ("step_s", "example_s", "tokens_per_s", "step_peak_mb", "process_peak_mb"):
            assert math.isfinite(row[key]) and row[key] > 0, (method, key)
        assert len(row["step_times_s"]) == result["timed_steps"]
    seq, batch = result["sizes"]["seq"], result["sizes"]["batch"]
    # Every sequence is exactly `seq` tokens; DPO and ORPO run chosen and rejected.
    assert result["methods"]["ift"]["tokens_per_step"] == batch * seq
    assert result["methods"]["dpo"]["tokens_per_step"] == 2 * batch * seq
    assert result["methods"]["orpo"]["tokens_per_step"] == 2 * batch * seq
    assert [p["seq"] for p in result["sweep"]] == [24, 48]
    assert all(p["ift_over_sft_time"] > 0 for p in result["sweep"])
    ift, sft = result["profile"]["phases_s"]["ift"], result["profile"]["phases_s"]["sft"]
    assert "intuition body forward (no grad)" in ift and "intuition body forward (no grad)" not in sft
    for phases in (ift, sft):  # the phases are parts of the step
        assert phases["forward total"] + phases["backward"] <= phases["step"] + 1e-9
        assert phases["training body forward"] <= phases["forward total"]
    printed = capsys.readouterr().out
    assert "ift_over_sft_time" in printed and "naive_ift" in printed


# --------------------------------------------------------------------------- the extra losses


def _tiny(dtype=torch.float64):
    sizes = bench.Sizes(vocab=50, hidden=16, layers=1, heads=2, intermediate=32, batch=3, seq=12, prompt=4)
    model = bench.make_model(sizes, seed=1, max_positions=16).to(dtype)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 50, (3, 12), generator=gen)
    labels = ids.clone()
    labels[:, :4] = -100
    labels[2, 9:] = -100  # a shorter completion
    return model, {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def _stub(tmp_path, **overrides):
    from iftune.trainer import IFTConfig, IFTTrainer

    args = IFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none",
                     activation_checkpointing=False, **overrides)
    stub = SimpleNamespace(args=args, state=SimpleNamespace(global_step=0),
                           accelerator=SimpleNamespace(num_processes=1))
    stub.window_mean = lambda *a: IFTTrainer.window_mean(stub, *a)
    return stub


def test_path_sft_is_per_sequence_cross_entropy(tmp_path):
    model, inputs = _tiny()
    loss = bench._path_sft_class().compute_loss(_stub(tmp_path), model, inputs)
    # Independent: full logits, log-softmax, per-sequence mean, mean over sequences.
    logits = model(input_ids=inputs["input_ids"]).logits[:, :-1]
    targets = inputs["labels"][:, 1:]
    mask = targets != -100
    logp = torch.log_softmax(logits, -1).gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1)
    expected = ((-(logp * mask)).sum(-1) / mask.sum(-1)).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-10)
    # And the spec's equivalence: IFT with lam = 0 and gamma = 0 is this SFT.
    same = ift_loss(model, inputs["input_ids"], inputs["labels"], inputs["attention_mask"], lam=0.0, gamma=0.0)
    assert loss.item() == pytest.approx(same.loss.item(), abs=1e-10)


def test_naive_ift_matches_chunked_ift(tmp_path):
    model, inputs = _tiny()
    stub = _stub(tmp_path, max_lambda=0.3, gamma=0.9)
    naive = bench._naive_ift_class().compute_loss(stub, model, inputs)
    chunked = ift_loss(model, inputs["input_ids"], inputs["labels"], inputs["attention_mask"], lam=0.3, gamma=0.9)
    assert naive.item() == pytest.approx(chunked.loss.item(), abs=1e-10)
    sft = bench._path_sft_class().compute_loss(stub, model, inputs)
    assert abs(naive.item() - sft.item()) > 1e-6  # lam and gamma do change the loss


# --------------------------------------------------------------------------- the relay


class _FakeTrainer:
    """Calls its callbacks like Trainer.train does, logging which trainer ran each step."""

    def __init__(self, name: str, steps: int, log: list[str]) -> None:
        self.name, self.steps, self.log, self.callbacks = name, steps, log, []

    def add_callback(self, cb) -> None:
        self.callbacks.append(cb)

    def train(self) -> None:
        state = SimpleNamespace(global_step=0)
        for _ in range(self.steps):
            for cb in self.callbacks:
                cb.on_step_begin(None, state, None)
            self.log.append(self.name)
            state.global_step += 1
            for cb in self.callbacks:
                cb.on_step_end(None, state, None)


def test_relay_interleaves_and_skips_warmup():
    log: list[str] = []
    fakes = {n: _FakeTrainer(n, 4, log) for n in ("a", "b", "c")}
    times = bench.time_interleaved(fakes, warmup=1, cuda=False)
    assert log == ["a", "b", "c"] * 4
    assert all(len(t) == 3 and min(t) >= 0 for t in times.values())


def test_relay_reports_a_failing_trainer():
    log: list[str] = []
    fakes = {"a": _FakeTrainer("a", 2, log), "b": _FakeTrainer("b", 2, log)}
    fakes["b"].train = lambda: (_ for _ in ()).throw(ValueError("boom"))
    with pytest.raises(RuntimeError, match="the b trainer failed"):
        bench.time_interleaved(fakes, warmup=0, cuda=False)
    assert log == ["a", "a"]


@pytest.mark.parametrize("argv, field", [
    (["--prompt", "600"], "--prompt"),
    (["--hidden", "250"], "--hidden"),
    (["--steps", "0"], "--steps"),
    (["--sweep", "4"], "--sweep"),
    (["--json", "/no/such/dir/x.json", "--quick"], "--json"),
])
def test_bad_options_are_user_errors(argv, field):
    with pytest.raises(UserError, match=field):
        bench.main(argv)
