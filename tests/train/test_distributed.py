"""Training under torchrun-style multi-process DDP (gloo, CPU), mixed precision, channels_last."""
import json
import os
import socket
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from polarprune_cuda.train import distributed as dist_mod
from polarprune_cuda import find_bank
from polarprune_cuda.train import loop, runs
from polarprune_cuda import train

from helpers import float64_runs, without_clock

TINY = dict(dataset="digits", model="resnet20", max_train=256, max_test=90, batch_size=32, epochs=2,
            warmup_epochs=0.0, ramp_epochs=1.0, min_channels=2, seed=3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, cfg_kwargs: dict, interrupt_after, float64=False):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if float64:
        float64_runs()
    saves = []
    original = train.Checkpointer.save

    def save(self, state):
        saves.append(self.path.name)
        original(self, state)

    train.Checkpointer.save = save
    info = dist_mod.setup("cpu")
    record = {"rank": rank, "saves": saves}
    try:
        cfg = train.PruneConfig(**cfg_kwargs)
        res = train.run_prune(cfg, out, progress=False, dist_info=info, resume=interrupt_after is None,
                                interrupt_after=interrupt_after)
        record.update(scores=find_bank(res.gated_model).scores.detach().clone(), history=asdict(res.history),
                      accuracy=res.pruned_accuracy, pruned=res.pruned_count,
                      state={k: v.detach().clone() for k, v in res.gated_model.state_dict().items()})
    except KeyboardInterrupt:
        record["interrupted"] = True
    finally:
        torch.save(record, Path(out) / f"rank{rank}.pt")
        dist_mod.cleanup(info)


def _spawn(tmp_path, name, cfg_kwargs, interrupt_after=None, world=2, float64=False):
    out = tmp_path / name
    out.mkdir(exist_ok=True)
    mp.spawn(_worker, args=(world, _free_port(), str(out), cfg_kwargs, interrupt_after, float64), nprocs=world,
             join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _assert_ranks_identical(ranks):
    """Every rank holds the same model and the same history, bit for bit (exact by construction: the
    gradients are all-reduced, the buffers broadcast, the penalty computed from identical scores)."""
    assert torch.equal(ranks[0]["scores"], ranks[1]["scores"])
    assert ranks[0]["state"].keys() == ranks[1]["state"].keys()
    for k, v in ranks[0]["state"].items():
        assert torch.equal(v, ranks[1]["state"][k]), k
    assert without_clock(ranks[0]["history"]) == without_clock(ranks[1]["history"])


def test_two_process_ddp_equals_one_process(tmp_path, monkeypatch):
    """Two ranks and one process compute the same two steps on the same global batches.

    Only the arithmetic is compared, not a trajectory: two steps (64 images, global batch 32), the gates and
    the penalty moving in both, data, weights and gate scores in float64. What differs between the layouts
    is the order of float sums (the all-reduce, the synchronised BatchNorm statistics, the batch split): a
    few float64 roundings, amplified by the gate step (gate_lr * 448 / 20 = 11.2 per unit gradient), which
    leaves differences of about 1e-14 to 1e-13. The tolerance (1e-10) leaves a factor of 1e3 to that and is
    still 1e6 times below what float32 arithmetic anywhere in the step would give. The hard gates and so the
    pruned counts are equal unless a score ends within 1e-10 of zero."""
    cfg_kwargs = TINY | {"sync_bn": True, "max_train": 64, "epochs": 1, "ramp_epochs": 0.0, "freeze_gates_at": 1.0}
    ranks = _spawn(tmp_path, "ddp", cfg_kwargs, float64=True)
    _assert_ranks_identical(ranks)
    float64_runs(monkeypatch.setattr)
    single = train.run_prune(train.PruneConfig(**cfg_kwargs), tmp_path / "one", progress=False)
    one = find_bank(single.gated_model).scores.detach()
    assert not torch.equal(one, torch.ones_like(one))                # the gates did move
    assert bool((one <= 0).any())                                    # and some closed
    assert one.dtype == torch.float64
    torch.testing.assert_close(ranks[0]["scores"], one, rtol=1e-10, atol=1e-10)
    assert (ranks[0]["scores"] > 0).tolist() == (one > 0).tolist()
    state = single.gated_model.state_dict()
    assert ranks[0]["state"].keys() == state.keys()
    for k, v in state.items():
        got = ranks[0]["state"][k]
        if v.dtype == torch.float64:
            torch.testing.assert_close(got, v, rtol=1e-10, atol=1e-10, msg=k)
        elif not v.is_floating_point():
            assert torch.equal(got, v), k                            # e.g. BatchNorm's num_batches_tracked
    assert ranks[0]["pruned"] == single.pruned_count
    # metrics are over the whole test set and all ranks, not rank 0's shard
    assert ranks[0]["history"]["test_accuracy"] == single.history.test_accuracy
    assert ranks[0]["history"]["train_loss"] == pytest.approx(single.history.train_loss, rel=1e-10)


def test_ddp_resume_after_interruption_equals_uninterrupted(tmp_path):
    """On one process layout a run is deterministic: resuming gives the uninterrupted run bit for bit."""
    cfg_kwargs = TINY | {"sync_bn": True}
    full = _spawn(tmp_path, "full", cfg_kwargs)
    _assert_ranks_identical(full)
    # the checkpoint is written by rank 0 only, once per epoch
    assert full[0]["saves"] == ["checkpoint.pt"] * TINY["epochs"] and full[1]["saves"] == []
    ckpt = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == TINY["epochs"] and ckpt["world_size"] == 2
    cut = _spawn(tmp_path, "cut", cfg_kwargs, interrupt_after=1)
    assert all(r.get("interrupted") for r in cut)
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    resumed = _spawn(tmp_path, "cut", cfg_kwargs)
    assert torch.equal(resumed[0]["scores"], full[0]["scores"])
    assert without_clock(resumed[0]["history"]) == without_clock(full[0]["history"])
    for k, v in full[0]["state"].items():
        assert torch.equal(resumed[0]["state"][k], v), k


def test_torchrun_cli_writes_one_report(tmp_path):
    """The README's command, on two CPU processes."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "polarprune_cuda", "prune", "--dataset", "digits", "--model", "resnet20", "--max-train", "128",
           "--max-test", "60", "--batch-size", "32", "--epochs", "1", "--latency-batch", "4", "--quiet",
           "--device", "cpu", "--sync-bn", "--out", str(out)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["processes"] == 2
    assert proc.stdout.count("achieved macs sparsity") == 1     # one rank prints, one report


def test_batch_smaller_than_world_is_refused():
    info = dist_mod.DistInfo(rank=0, world_size=4)
    with pytest.raises(ValueError, match="batch-size is the global batch"):
        runs._check_world(train.PruneConfig(batch_size=2), info)
    assert dist_mod.shard(10, dist_mod.DistInfo(rank=1, world_size=3)) == slice(4, 7)
    assert dist_mod.shard(2, dist_mod.DistInfo(rank=0, world_size=3)) is None


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_run_extracts_a_matching_model(tmp_path, amp):
    cfg = train.PruneConfig(**(TINY | {"amp": amp, "channels_last": True, "epochs": 2}))
    res = train.run_prune(cfg, tmp_path / amp, progress=False)
    bank = find_bank(res.gated_model)
    assert torch.isfinite(bank.scores).all()
    gates = torch.cat(bank.gates())
    assert set(gates.unique().tolist()) <= {0.0, 1.0}              # exactly binary
    x = res.data.test_x[:32].contiguous(memory_format=torch.channels_last)
    res.gated_model.eval()
    res.pruned_model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=loop.AMP_DTYPES[amp]):
        a, b = res.gated_model(x).float(), res.pruned_model(x).float()
    tol = 0.05 if amp == "bf16" else 0.01
    assert (a - b).abs().max() <= tol * a.abs().max()
    assert (a.argmax(1) == b.argmax(1)).float().mean() >= 0.9
    assert res.history.train_loss[-1] < res.history.train_loss[0]
    if amp == "fp16":
        ckpt = torch.load(tmp_path / amp / "checkpoint.pt", weights_only=True)
        assert ckpt["scaler"]["scale"] > 0                          # the grad scaler's state is saved


def test_amp_option_is_checked(tmp_path):
    with pytest.raises(ValueError, match="amp must be bf16 or fp16"):
        train.PruneConfig(amp="int8").validate()


def test_cost_latency_is_refused_under_torchrun():
    info = dist_mod.DistInfo(rank=0, world_size=2)
    with pytest.raises(ValueError, match="cost latency runs on one process"):
        runs._check_world(train.PruneConfig(cost="latency"), info)
