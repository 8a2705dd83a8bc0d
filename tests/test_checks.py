"""iftune.checks and iftune.callbacks as functions: truncated weight files, and the finite-weights
check agreeing across processes (so that every rank stops at the same step)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from iftune.callbacks import all_finite, finite_norm
from iftune.checks import check_against_model, check_weight_files, safetensors_problem
from iftune.errors import UserError


def test_safetensors_problem(tmp_path):
    """A file cut anywhere (in the data as well as in the header) is refused, with the flag and
    the file named; whole files pass."""
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(64), "b": torch.zeros(3, 5)}, str(path))
    whole = path.read_bytes()
    assert safetensors_problem(path) is None
    header = 8 + int.from_bytes(whole[:8], "little")
    assert len(whole) == header + (64 + 15) * 4
    cuts = {
        "last byte of the data": whole[:-1],
        "the last tensor": whole[: header + 64 * 4],
        "all the data": whole[:header],
        "inside the header": whole[:20],
        "before the header's length": whole[:5],
        "empty": b"",
        "unreadable header": len(b"{nope").to_bytes(8, "little") + b"{nope",
    }
    for what, data in cuts.items():
        path.write_bytes(data)
        assert safetensors_problem(path), what
        with pytest.raises(UserError) as err:
            check_weight_files(tmp_path, "--model_name_or_path")
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"--model_name_or_path: {path}: truncated"), what
    path.write_bytes(len(json.dumps({}).encode()).to_bytes(8, "little") + b"{}")
    assert safetensors_problem(path) is None  # no tensors: nothing is missing
    check_weight_files(tmp_path, "--model_name_or_path")


def test_finite_checks_one_process():
    big = torch.full((4,), 1e30)  # finite, but its squares overflow float32
    assert all_finite([big, torch.zeros(0)]) and not finite_norm([big])
    assert not all_finite([torch.ones(3), torch.tensor([1.0, float("nan")])])
    assert not all_finite([torch.tensor([float("-inf")])])
    assert all_finite([]) and finite_norm([])


def _rank(rank: int, port: int, data: str, cache: str, results: str) -> None:
    """One of two CPU processes set up as `accelerate launch` / torchrun would (accelerate's
    state first, as TrainingArguments makes it, then the data, then a step's NaN check)."""
    import logging
    import os

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
    )
    import datasets
    from accelerate import PartialState

    from iftune.data import load_training_data

    state = PartialState(cpu=True)
    datasets.config.HF_DATASETS_CACHE = cache
    datasets.logging.set_verbosity_info()
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    datasets.logging.get_logger().addHandler(handler)
    rows = load_training_data([data], "sft")
    mine = torch.tensor([float("nan")]) if rank == 1 else torch.ones(2)
    out = {
        "processes": state.num_processes,
        "rows": len(rows),
        "cached": any("Loading cached processed dataset" in m for m in seen),
        "finite": [all_finite([mine]), all_finite([torch.ones(2)]), finite_norm([mine])],
    }
    with open(f"{results}.{rank}", "w") as fh:
        json.dump(out, fh)
    state.destroy_process_group()


@pytest.mark.slow
def test_two_processes_share_the_data_and_stop_together(tmp_path):
    """Rank 0 converts the data while rank 1 waits, then rank 1 reads rank 0's cache (issue 10
    item 9); a NaN in one rank's shard (FSDP2 / ZeRO-3 keep different shards) stops both."""
    import socket

    import torch.multiprocessing as mp

    from conftest import conversations, write_jsonl

    data = write_jsonl(tmp_path / "chat.jsonl", conversations(32))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = str(tmp_path / "out")
    mp.spawn(_rank, args=(port, str(data), str(tmp_path / "cache"), results), nprocs=2, join=True)
    got = [json.loads(Path(f"{results}.{rank}").read_text()) for rank in (0, 1)]
    assert [g["processes"] for g in got] == [2, 2] and [g["rows"] for g in got] == [32, 32]
    assert [g["cached"] for g in got] == [False, True]
    assert [g["finite"] for g in got] == [[False, True, False]] * 2


def test_lm_head_vocab_size_is_read_or_refused():
    """The head's output size comes from its weight (the full shape under ZeRO-3) or
    `out_features`; a head with neither is refused, not given a guessed size."""
    from torch import nn

    from iftune.lm_head import token_logprobs, vocab_size

    head = nn.Linear(8, 37, bias=False)
    assert vocab_size(head) == 37
    head.weight.ds_shape = torch.Size([1000, 8])  # ZeRO-3 keeps a 0-element local partition
    assert vocab_size(head) == 1000

    class Projection(nn.Module):  # computes logits with another module's weight
        def __init__(self, weight: torch.Tensor) -> None:
            super().__init__()
            self.source = [weight]

        def forward(self, hidden: torch.Tensor) -> torch.Tensor:
            return hidden @ self.source[0].T

    odd = Projection(torch.randn(37, 8))
    with pytest.raises(ValueError, match=r"Projection.*head_chunk_size"):
        vocab_size(odd)
    odd.out_features = 37
    assert vocab_size(odd) == 37
    del odd.out_features
    hidden, targets = torch.randn(2, 5, 8), torch.randint(0, 37, (2, 5))
    expected = torch.log_softmax(hidden @ odd.source[0].T, -1).gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(token_logprobs(hidden, odd, targets, chunk_size=3), expected)


def test_router_aux_loss_coef_needs_a_mixture_of_experts_model():
    from types import SimpleNamespace

    from transformers import LlamaConfig, Qwen3MoeConfig

    args = SimpleNamespace(router_aux_loss_coef=0.01, max_length=None)
    with pytest.raises(
        UserError, match=r"--router_aux_loss_coef 0.01: the model \(llama\) is not a mixture-of-experts"
    ):
        check_against_model(LlamaConfig(), args)
    check_against_model(Qwen3MoeConfig(), args)  # a MoE model takes it
    check_against_model(LlamaConfig(), SimpleNamespace(router_aux_loss_coef=None, max_length=None))  # unset: fine
