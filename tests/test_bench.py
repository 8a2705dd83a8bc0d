"""`iftune bench`: the quick and tiny-preset runs' JSON, the two benchmark-only losses, the step
relay, the CUDA branch on a CPU stand-in, the shared-weights trainers, the tiny builders."""

from __future__ import annotations

import contextlib
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from iftune.benchmarks.baselines import NaiveIFTTrainer, PathSFTTrainer
from iftune.benchmarks.command import PRESET_METHODS, main
from iftune.benchmarks.measure import Clock, floor_split, grad_bytes, peak_during, time_interleaved
from iftune.benchmarks.profile import IFT_RANGES
from iftune.benchmarks.run import targets_for
from iftune.benchmarks.setup import METHODS, TRAINER_OF, Sizes, is_preference, make_model, shared_copies
from iftune.errors import UserError
from iftune.objective import ift_loss
from iftune.tiny import SPECIALS, numbered_tokenizer

RATIO_KEYS = {
    "ift_over_sft_time",
    "ift_over_sft_memory",
    "ift_over_trl_sft_time",
    "ift_over_dpo_time_per_example",
    "ift_over_orpo_time_per_example",
    "naive_over_ift_memory",
    "naive_over_ift_time",
    "ift_over_sft_later_memory",
    "ift_over_sft_cpu_time",
    "ift_over_trl_sft_cpu_time",
    "naive_over_ift_later_memory",
    "ift_over_sft_activation_memory",
    "naive_over_ift_activation_memory",
}


def test_quick_run_writes_every_key(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--quick", "--profile", "--json", str(out), "--plot", str(tmp_path / "sweep.png")]) == 0
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    result = json.loads(out.read_text())
    assert set(result["ratios"]) == RATIO_KEYS
    for key, value in result["ratios"].items():
        assert math.isfinite(value) and value > 0, key
    assert set(result["methods"]) == set(METHODS)
    for method, row in result["methods"].items():
        for key in (
            "step_s",
            "step_cpu_s",
            "example_s",
            "tokens_per_s",
            "step_peak_mb",
            "later_step_peak_mb",
            "process_peak_mb",
            "grad_mb",
            "static_mb",
        ):
            assert math.isfinite(row[key]) and row[key] > 0, (method, key)
        assert len(row["step_times_s"]) == result["timed_steps"]
        # The later steps' peak is the floor's gradients plus the activations.
        assert row["activation_mb"] <= row["later_step_peak_mb"], method
    seq, batch = result["sizes"]["seq"], result["sizes"]["batch"]
    # Every sequence is exactly `seq` tokens; DPO and ORPO run chosen and rejected.
    assert result["methods"]["ift"]["tokens_per_step"] == batch * seq
    assert result["methods"]["dpo"]["tokens_per_step"] == 2 * batch * seq
    assert result["methods"]["orpo"]["tokens_per_step"] == 2 * batch * seq
    assert [p["seq"] for p in result["sweep"]] == [24, 48]
    for m in ("sft", "ift", "naive_ift"):
        assert all(p[f"{m}_step_s"] > 0 and p[f"{m}_step_peak_mb"] > 0 for p in result["sweep"])
    assert all(p["ift_over_sft_time"] > 0 for p in result["sweep"])
    prof = result["profile"]
    ift, sft = prof["phases_s"]["ift"], prof["phases_s"]["sft"]
    # The objective's own ranges; the SFT step has the training pass's two and no intuition pass.
    assert set(IFT_RANGES) <= set(ift)
    assert {r for r in IFT_RANGES if r in sft} == {"ift.training_forward", "ift.training_head"}
    for phases in (ift, sft):  # the ranges are parts of the step: what is left is not negative
        assert phases["backward and the rest"] >= 0
    assert 0 < prof["intuition_share"] < 1
    printed = capsys.readouterr().out
    assert "ift_over_sft_time" in printed and "naive_ift" in printed


def test_activation_memory_is_the_peak_above_the_static_floor():
    mib = 2**20
    # Gradients freed after each step (zero_grad to None): the second step allocates them again.
    split = floor_split(1000 * mib, 1500 * mib, 2600 * mib, 400 * mib, 0)
    assert split == {"static_mb": 900.0, "activation_mb": 700.0}
    # Gradients kept between steps: already in what the second step began with.
    split = floor_split(1000 * mib, 1900 * mib, 2600 * mib, 400 * mib, 400 * mib)
    assert split == {"static_mb": 900.0, "activation_mb": 700.0}
    model = torch.nn.Linear(3, 2)
    assert grad_bytes(model) == 0 and grad_bytes(None) == 0
    model(torch.ones(1, 3)).sum().backward()
    assert grad_bytes(model) == (3 * 2 + 2) * 4


def test_activation_target_from_batch_four():
    assert "naive_over_ift_activation_memory" not in targets_for(True, 1)
    assert targets_for(True, 4)["naive_over_ift_activation_memory"] == (">=", 3.0)
    assert targets_for(True, 4)["naive_over_ift_time"] == (">=", 0.95)
    assert "naive_over_ift_activation_memory" not in targets_for(False, 8)


# --------------------------------------------------------------------------- the extra losses


def _tiny(dtype=torch.float64):
    sizes = Sizes(vocab=50, hidden=16, layers=1, heads=2, intermediate=32, batch=3, seq=12, prompt=4)
    model = make_model(sizes, seed=1, max_positions=16).to(dtype)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 50, (3, 12), generator=gen)
    labels = ids.clone()
    labels[:, :4] = -100
    labels[2, 9:] = -100  # a shorter completion
    return model, {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def _stub(tmp_path, **overrides):
    from iftune.trainer import IFTConfig, IFTTrainer

    args = IFTConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        report_to="none",
        activation_checkpointing=False,
        **overrides,
    )
    stub = SimpleNamespace(
        args=args,
        state=SimpleNamespace(global_step=0),
        accelerator=SimpleNamespace(num_processes=1, autocast=contextlib.nullcontext),
    )
    stub._naive_loss = lambda *a: NaiveIFTTrainer._naive_loss(stub, *a)
    stub.window_mean = lambda *a: IFTTrainer.window_mean(stub, *a)
    return stub


def test_path_sft_is_per_sequence_cross_entropy(tmp_path):
    model, inputs = _tiny()
    loss = PathSFTTrainer.compute_loss(_stub(tmp_path), model, inputs)
    # Independent: full logits, log-softmax, per-sequence mean, mean over sequences.
    logits = model(input_ids=inputs["input_ids"]).logits[:, :-1]
    targets = inputs["labels"][:, 1:]
    mask = targets != -100
    logp = torch.log_softmax(logits, -1).gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1)
    expected = ((-(logp * mask)).sum(-1) / mask.sum(-1)).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-10)
    # And the specification's equivalence (docs/objective.md): IFT with lam = 0 and gamma = 0 is this SFT.
    same = ift_loss(model, inputs["input_ids"], inputs["labels"], inputs["attention_mask"], lam=0.0, gamma=0.0)
    assert loss.item() == pytest.approx(same.loss.item(), abs=1e-10)


def test_naive_ift_matches_chunked_ift(tmp_path):
    model, inputs = _tiny()
    stub = _stub(tmp_path, max_lambda=0.3, gamma=0.9)
    naive = NaiveIFTTrainer.compute_loss(stub, model, inputs)
    chunked = ift_loss(model, inputs["input_ids"], inputs["labels"], inputs["attention_mask"], lam=0.3, gamma=0.9)
    assert naive.item() == pytest.approx(chunked.loss.item(), abs=1e-10)
    sft = PathSFTTrainer.compute_loss(stub, model, inputs)
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
    cpu: dict[str, list[float]] = {}
    times = time_interleaved(fakes, warmup=1, cpu_times=cpu)
    assert log == ["a", "b", "c"] * 4
    assert all(len(t) == 3 and min(t) >= 0 for t in (*times.values(), *cpu.values()))
    assert set(cpu) == set(times)


def test_relay_reports_a_failing_trainer():
    log: list[str] = []
    fakes = {"a": _FakeTrainer("a", 2, log), "b": _FakeTrainer("b", 2, log)}
    fakes["b"].train = lambda: (_ for _ in ()).throw(ValueError("boom"))
    with pytest.raises(RuntimeError, match="the b trainer failed"):
        time_interleaved(fakes, warmup=0)
    assert log == ["a", "a"]


@pytest.mark.parametrize(
    "argv, field",
    [
        (["--prompt", "600"], "--prompt"),
        (["--hidden", "250"], "--hidden"),
        (["--steps", "0"], "--steps"),
        (["--sweep", "4"], "--sweep"),
        (["--json", "/no/such/dir/x.json", "--quick"], "--json"),
        (["--preset", "tiny", "--methods", "ift", "--profile"], "--profile"),
        (["--preset", "tiny", "--heads", "3"], "--heads"),
        (["--quick", "--no-sweep", "--plot", "x.png"], "--plot"),
        (["--preset", "tiny", "--sweep-only"], "--sweep"),
    ],
)
def test_bad_options_are_user_errors(argv, field):
    with pytest.raises(UserError, match=field):
        main(argv)


# --------------------------------------------------------------------------- presets and bf16


def test_tiny_preset_in_bf16(tmp_path, capsys):
    """The preset path (Qwen2 architecture, tied head, grouped-query attention, cut depth) with
    bf16 mixed precision ON, the output folder spelled as the training commands spell it."""
    assert (
        main(
            [
                "--preset",
                "tiny",
                "--precision",
                "bf16",
                "--no-sweep",
                "--steps",
                "1",
                "--output_dir",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "out" / "bench-tiny-bf16.json").read_text())
    assert result["label"] == "tiny shape, 1 of 2 layers" and result["precision"] == "bf16"
    assert tuple(result["methods"]) == PRESET_METHODS
    # A preset's targets at batch 2, and only those (the activation-memory one from batch 4 on).
    assert set(result["targets"]) == {
        "ift_over_sft_time",
        "ift_over_sft_memory",
        "naive_over_ift_time",
        "ift_over_trl_sft_time",
    }
    assert result["targets"]["naive_over_ift_time"]["bound"] == ">= 0.95"
    assert result["targets"]["ift_over_sft_time"]["bound"] == "<= 1.25"
    assert "tiny shape, 1 of 2 layers" in capsys.readouterr().out


def test_preset_model_has_the_real_layout():
    from iftune.benchmarks.setup import PRESETS

    sizes = PRESETS["qwen2.5-0.5b"]
    assert sizes.label() == f"Qwen2.5-0.5B shape, {sizes.layers} of 24 layers"
    small = Sizes(**{**sizes.__dict__, "vocab": 300, "hidden": 28, "intermediate": 40, "heads": 14})
    model = make_model(small, seed=0, max_positions=64, precision="bf16-weights")
    cfg = model.config
    assert (cfg.model_type, cfg.num_attention_heads, cfg.num_key_value_heads) == ("qwen2", 14, 2)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16


# --------------------------------------------------------------------------- the CUDA branch, on a stand-in


class _FakeCuda:
    """What the benchmark calls of `torch.cuda`, on a fake clock and a fake allocator: each
    `Event.record` reads a clock that advances 250 ms per read; memory is what `run` allocates."""

    def __init__(self) -> None:
        self.now_ms, self.syncs, self.allocated, self.peak = 0.0, 0, 100 * 2**20, 0

    def Event(self, enable_timing: bool = False):  # noqa: N802 (torch's name)
        cuda = self
        assert enable_timing

        class Event:
            def record(self):
                cuda.now_ms += 250.0
                self.at = cuda.now_ms

            def synchronize(self):
                cuda.syncs += 1

            def elapsed_time(self, end) -> float:
                return end.at - self.at

        return Event()

    def synchronize(self) -> None:
        self.syncs += 1

    def reset_peak_memory_stats(self) -> None:
        self.peak = self.allocated

    def memory_allocated(self) -> int:
        return self.allocated

    def max_memory_allocated(self) -> int:
        return self.peak

    def alloc(self, n: int) -> None:
        self.allocated += n
        self.peak = max(self.peak, self.allocated)


def test_cuda_timing_uses_events():
    cuda = _FakeCuda()
    log: list[str] = []
    fakes = {n: _FakeTrainer(n, 3, log) for n in ("a", "b")}
    times = time_interleaved(fakes, warmup=1, clock=Clock(cuda))
    # Start and end events are consecutive records: 250 ms per step, whatever the host clock says.
    assert times == {"a": [0.25, 0.25], "b": [0.25, 0.25]}
    assert cuda.syncs >= 12  # a device sync before each step and on each end event


def test_cuda_memory_is_peak_allocated_above_the_start():
    cuda = _FakeCuda()

    def run():
        cuda.alloc(300 * 2**20)
        cuda.alloc(-250 * 2**20)

    got = peak_during(run, cuda)
    assert got == {"process_peak_mb": 400.0, "step_peak_mb": 300.0}


# --------------------------------------------------------------------------- shared weights, method lists, tokenizer


def test_shared_copies_share_parameters_not_modules():
    model = make_model(Sizes(vocab=40, hidden=8, layers=1, heads=2, intermediate=16), seed=0, max_positions=16)
    a, b = shared_copies(model, 2)
    assert a is not b and a.model is not b.model
    for pa, pb, p in zip(a.parameters(), b.parameters(), model.parameters()):
        assert pa is pb is p
    with torch.no_grad():
        next(a.parameters()).add_(1.0)  # an optimizer step through one trainer moves all
    ids = torch.tensor([[8, 9, 10]])
    assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)


def test_method_lists_agree():
    from iftune.data import PREFERENCE_METHODS
    from iftune.train import METHODS as TRAIN_METHODS

    assert set(TRAINER_OF.values()) == set(TRAIN_METHODS)
    assert {m for m in METHODS if is_preference(m)} == set(PREFERENCE_METHODS)


def test_numbered_tokenizer_is_one_token_per_word():
    tok = numbered_tokenizer(50)
    assert len(tok) == 50
    assert tok("t7 t49 t12", add_special_tokens=False)["input_ids"] == [7, 49, 12]
    assert tok.convert_ids_to_tokens([0, 2]) == [SPECIALS[0], SPECIALS[2]] == [tok.pad_token, tok.eos_token]
    with pytest.raises(ValueError, match="vocab_size"):
        numbered_tokenizer(len(SPECIALS))


# --------------------------------------------------------------------------- the overheads' micro-benchmark


def test_overheads_at_tiny_sizes(capsys):
    from iftune.benchmarks import overheads
    from iftune.benchmarks.setup import PRESETS

    sizes = PRESETS["tiny"]
    r = overheads.bench_lookups(sizes, 1, torch.device("cpu"))
    # One lookup of the concatenated ids: the same gradient up to the order of the float sums.
    assert 0 <= r["max_grad_diff"] < 1e-5 and r["one_lookup_s"] > 0 and r["two_lookups_s"] > 0
    table = torch.nn.Embedding(sizes.vocab, sizes.hidden)
    ids, intuitive = overheads.batch_ids(sizes, torch.device("cpu"))
    one, two = (f(table, ids, intuitive, 0.3) for f in (overheads.one_lookup, overheads.two_lookups))
    assert torch.equal(one, two)  # the forward is the same bit for bit
    assert overheads.main(["--preset", "tiny", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert (
        "one / two" in out
        and "guard / clip" in out
        and "full logits over" in out
        and "x that pass" in out
        and "log-sum-exp" in out
    )


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_overheads_intuition_splits_an_ift_step(precision):
    """The intuition part times the three steps it names and derives its ratios from them; its SFT
    step is PathSFTTrainer's loss, which equals IFT's at lam = 0, gamma = 0 (docs/objective.md)."""
    from iftune.benchmarks import overheads
    from iftune.benchmarks.baselines import path_sft_sums
    from iftune.benchmarks.setup import PRESETS, make_model
    from iftune.objective import ift_loss

    sizes = PRESETS["tiny"]
    r = overheads.bench_intuition(sizes, 1, torch.device("cpu"), precision)
    assert min(r["sft_s"], r["ift_s"], r["intuition_s"]) > 0
    assert r["ift_over_sft"] == pytest.approx(1 + r["extra_over_intuition"] * r["intuition_over_sft"])
    assert r["intuition_over_sft"] == pytest.approx(r["intuition_s"] / r["sft_s"])
    model = make_model(sizes, 0, sizes.seq)
    ids, _ = overheads.batch_ids(sizes, torch.device("cpu"))
    labels = ids.masked_fill(torch.arange(sizes.seq) < sizes.prompt, -100)
    loss_sum, n_sequences = path_sft_sums(model, ids, labels)
    torch.testing.assert_close(loss_sum / n_sequences, ift_loss(model, ids, labels, lam=0.0, gamma=0.0).loss)


# --------------------------------------------------------------------------- the GPU check, on a stand-in


class _FakeDevice(_FakeCuda):
    """`_FakeCuda` plus what the GPU check reads of the device."""

    def get_device_name(self, index: int = 0) -> str:
        return "Fake GPU"

    def get_device_capability(self, index: int = 0) -> tuple[int, int]:
        return (9, 0)

    def get_device_properties(self, index: int = 0):
        return SimpleNamespace(total_memory=80 * 2**30)

    def device_count(self) -> int:
        return 1

    def empty_cache(self) -> None:
        pass


def test_gpu_check_without_cuda_is_one_line():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(UserError, match="--gpu-check: no CUDA device"):
        main(["--gpu-check"])


def test_gpu_check_on_a_stand_in_device(tmp_path):
    """The CUDA branch on a CPU: the clock and the allocator are `_FakeDevice`'s, the trainers
    run on the CPU with bf16 ON. The flash-attention group fails here (no flash_attn) and is
    recorded, and the groups after it are still written."""
    from iftune.benchmarks.gpu_check import format_gpu_check, plan, run_gpu_check

    assert [(r["shape"], r["group"]) for r in plan()] == [
        ("qwen2.5-0.5b", "methods"),
        ("qwen2.5-0.5b", "heads"),
        ("llama-3.2-1b", "methods"),
        ("llama-3.2-1b", "heads"),
    ]
    cuda, path, lines = _FakeDevice(), tmp_path / "gpu.json", []
    kw = dict(shapes=("tiny",), on_cuda=False, log=lines.append)
    result = run_gpu_check(cuda, str(path), flash=True, warmup=0, steps=2, batch=2, **kw)
    assert lines[0].startswith("gpu-check: Fake GPU (compute 9.0, 80.0 GiB")
    assert "torch " in lines[1] and "trl " in lines[1]
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))
    methods, heads, flash = result["groups"]
    assert methods["label"] == "tiny shape, 2 of 2 layers" and methods["batch"] == 2  # full depth
    assert set(methods["per_method"]) == {"trl_sft", "sft", "ift"}
    assert set(heads["per_method"]) == {"ift", "ift_trl_head", "trl_sft", "naive_ift"}
    for row in (*methods["per_method"].values(), *heads["per_method"].values()):
        assert row["step_times_s"] == [0.25, 0.25]  # the fake device's events, not the host clock
        assert row["tokens_per_step"] == 2 * 48 and row["tokens_per_s"] == 2 * 48 / 0.25
        # Nothing is allocated on the fake device: peak and activations are what it began with.
        assert row["step_peak_mb"] == 100.0 and row["activation_mb"] <= 0
    assert set(methods["ratios"]) >= {"ift_over_sft_time", "ift_over_trl_sft_time", "ift_over_sft_memory"}
    # Every ratio of the heads group, from the fake clock's equal step times.
    assert {k: heads["ratios"][k] for k in heads["ratios"] if k.endswith("_time")} == {
        "ift_over_trl_sft_time": 1.0,
        "trl_head_over_iftune_head_time": 1.0,
        "ift_trl_head_over_trl_sft_time": 1.0,
        "naive_over_ift_time": 1.0,
        "naive_over_ift_trl_head_time": 1.0,
    }
    assert "naive_over_ift_activation_memory" in heads["ratios"]
    assert flash["attention"] == "flash_attention_2" and flash["padding_free"] and "error" in flash
    table = format_gpu_check(result)
    assert "ift_trl_head" in table and "flash_attention_2 padding-free" in table
    # No group starts once the time budget is spent; each is still listed.
    spent = run_gpu_check(cuda, str(path), flash=False, budget_s=-1, **kw)
    assert [g["skipped"] for g in spent["groups"]] == ["time budget of -1 s spent"] * 2


def test_relay_records_each_steps_cuda_peak():
    cuda = _FakeDevice()

    class Allocating(_FakeTrainer):
        def train(self) -> None:
            state = SimpleNamespace(global_step=0)
            for _ in range(self.steps):
                for cb in self.callbacks:
                    cb.on_step_begin(None, state, None)
                cuda.alloc(300 * 2**20)  # activations
                cuda.alloc(-300 * 2**20)
                state.global_step += 1
                for cb in self.callbacks:
                    cb.on_step_end(None, state, None)

    memory: dict = {}
    time_interleaved({"a": Allocating("a", 3, [])}, warmup=1, clock=Clock(cuda), memory=memory)
    assert [p["activation_mb"] for p in memory["a"]] == [300.0, 300.0]
    assert [p["process_peak_mb"] for p in memory["a"]] == [400.0, 400.0]


# --------------------------------------------------------------------------- the matrix


def test_matrix_rows_table_and_a_failed_row(tmp_path, capsys, monkeypatch):
    from iftune.benchmarks import matrix

    assert [(r["preset"], r["batch"], r["precision"]) for r in matrix.plan(("qwen2.5-0.5b",), (1, 4), ("fp32",))] == [
        ("qwen2.5-0.5b", 1, "fp32"),
        ("qwen2.5-0.5b", 4, "fp32"),
        ("qwen2.5-0.5b", 1, "fp32"),  # DPO and ORPO
    ]
    real = matrix.run_bench

    def run_bench(sizes, opt, *args, methods, **kw):
        if "dpo" in methods:
            raise RuntimeError("no preference row in this test")
        return real(sizes, opt, *args, methods=methods, **kw)

    monkeypatch.setattr(matrix, "run_bench", run_bench)
    out = tmp_path / "matrix.json"
    argv = ["--matrix", "--preset", "tiny", "--batch", "2", "--precision", "bf16", "--steps", "2", "--warmup", "0"]
    assert main([*argv, "--json", str(out)]) == 1  # the failed row
    result = json.loads(out.read_text())
    assert result["timed_steps"] == 2 and result["commit"]
    first, failed = result["rows"]
    assert (first["preset"], first["batch"], first["precision"]) == ("tiny", 2, "bf16")
    assert first["methods"]["ift"]["step_times_s"] and len(first["methods"]["sft"]["step_times_s"]) == 2
    assert first["ratios"]["ift_over_sft_time"] > 0 and "ift_over_sft_activation_memory" in first["ratios"]
    assert failed["error"] == "RuntimeError: no preference row in this test"
    printed = capsys.readouterr().out
    assert "| tiny | 2 | bf16 |" in printed and "failed: RuntimeError" in printed


def test_matrix_defaults_reach_the_run_and_its_json(monkeypatch, capsys):
    from iftune.benchmarks import matrix

    seen = {}

    def run_matrix(rows, path, *, warmup, steps, seed=0):
        seen.update(warmup=warmup, steps=steps, rows=rows)
        return {"commit": "x", "warmup_steps": warmup, "timed_steps": steps, "rows": []}

    monkeypatch.setattr(matrix, "run_matrix", run_matrix)
    assert main(["--matrix", "--preset", "tiny", "--batch", "2"]) == 0
    assert (seen["warmup"], seen["steps"]) == (matrix.WARMUP, matrix.STEPS) and matrix.WARMUP >= 3
    assert f"{matrix.WARMUP} warm-up + {matrix.STEPS} timed steps" in capsys.readouterr().out
    assert main(["--matrix", "--preset", "tiny", "--batch", "2", "--warmup", "0", "--steps", "1"]) == 0
    assert (seen["warmup"], seen["steps"]) == (0, 1)  # an explicit value is kept, 0 included
