"""iftune.checks and iftune.callbacks as functions: truncated weight files, and the finite-weights
check agreeing across processes (so that every rank stops at the same step)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from iftune.callbacks import all_finite, finite_norm
from iftune.checks import safetensors_problem


def test_safetensors_problem(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(64), "b": torch.zeros(3, 5)}, str(path))
    whole = path.read_bytes()
    assert safetensors_problem(path) is None
    header = 8 + int.from_bytes(whole[:8], "little")
    data = 64 * 4 + 15 * 4
    assert len(whole) == header + data
    path.write_bytes(whole[:-1])
    assert safetensors_problem(path) == f"truncated ({header + data - 1} of {header + data} bytes)"
    path.write_bytes(whole[:20])
    assert safetensors_problem(path).startswith("truncated (header of")
    path.write_bytes(whole[:5])
    assert safetensors_problem(path) == "truncated (5 bytes, no header)"
    path.write_bytes(len(b"{nope").to_bytes(8, "little") + b"{nope")
    assert safetensors_problem(path) == "not a safetensors file (unreadable header)"
    path.write_bytes(len(json.dumps({}).encode()).to_bytes(8, "little") + b"{}")
    assert safetensors_problem(path) is None  # no tensors: nothing is missing


def test_finite_checks_one_process():
    big = torch.full((4,), 1e30)  # finite, but its squares overflow float32
    assert all_finite([big, torch.zeros(0)]) and not finite_norm([big])
    assert not all_finite([torch.ones(3), torch.tensor([1.0, float("nan")])])
    assert not all_finite([torch.tensor([float("-inf")])])
    assert all_finite([]) and finite_norm([])


def _rank(rank: int, init: str, results: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        mine = torch.tensor([float("nan")]) if rank == 1 else torch.ones(2)
        out = [all_finite([mine]), all_finite([torch.ones(2)]), finite_norm([mine])]
        with open(f"{results}.{rank}", "w") as fh:
            json.dump(out, fh)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ranks_agree_when_only_one_sees_nan(tmp_path):
    """A NaN in one rank's shard (FSDP2 / ZeRO-3 keep different shards) stops every rank."""
    import torch.multiprocessing as mp

    results = str(tmp_path / "out")
    mp.spawn(_rank, args=(f"file://{tmp_path / 'store'}", results), nprocs=2, join=True)
    for rank in (0, 1):
        assert json.loads(open(f"{results}.{rank}").read()) == [False, True, False]
