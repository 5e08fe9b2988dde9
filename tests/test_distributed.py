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

from polarprune_cuda import distributed as dist_mod
from polarprune_cuda import find_bank, trainer

TINY = dict(dataset="digits", model="resnet20", max_train=256, max_test=90, batch_size=32, epochs=2,
            warmup_epochs=0.0, ramp_epochs=1.0, min_channels=2, seed=3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, cfg_kwargs: dict, interrupt_after):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    saves = []
    original = trainer.Checkpointer.save

    def save(self, state):
        saves.append(self.path.name)
        original(self, state)

    trainer.Checkpointer.save = save
    info = dist_mod.setup("cpu")
    record = {"rank": rank, "saves": saves}
    try:
        cfg = trainer.PruneConfig(**cfg_kwargs)
        res = trainer.run_prune(cfg, out, progress=False, dist_info=info, resume=interrupt_after is None,
                                interrupt_after=interrupt_after)
        record.update(scores=find_bank(res.gated_model).scores.detach().clone(), history=asdict(res.history),
                      accuracy=res.pruned_accuracy, pruned=res.pruned_count)
    except KeyboardInterrupt:
        record["interrupted"] = True
    finally:
        torch.save(record, Path(out) / f"rank{rank}.pt")
        dist_mod.cleanup(info)


def _spawn(tmp_path, name, cfg_kwargs, interrupt_after=None, world=2):
    out = tmp_path / name
    out.mkdir(exist_ok=True)
    mp.spawn(_worker, args=(world, _free_port(), str(out), cfg_kwargs, interrupt_after), nprocs=world, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def test_two_process_ddp_equals_one_process(tmp_path):
    # small steps: with the default gate step (lr 0.5 x 448 gates / 20) float rounding, which differs
    # between one all-reduced sum and one batched sum, grows by about 10x per step once gates flip
    cfg_kwargs = TINY | {"sync_bn": True, "gate_lr": 0.02, "lr": 0.02}
    ranks = _spawn(tmp_path, "ddp", cfg_kwargs)
    # identical gates on both ranks, bit for bit
    assert torch.equal(ranks[0]["scores"], ranks[1]["scores"])
    assert ranks[0]["history"] == ranks[1]["history"]
    # the checkpoint is written by rank 0 only, once per epoch
    assert ranks[0]["saves"] == ["checkpoint.pt"] * TINY["epochs"] and ranks[1]["saves"] == []
    ckpt = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == TINY["epochs"] and ckpt["world_size"] == 2
    # the same global batches on one process give the same result, up to float rounding
    single = trainer.run_prune(trainer.PruneConfig(**cfg_kwargs), tmp_path / "one", progress=False)
    one = find_bank(single.gated_model).scores.detach()
    assert not torch.equal(one, torch.ones_like(one))                # the gates did move
    torch.testing.assert_close(ranks[0]["scores"], one, rtol=1e-4, atol=1e-4)
    assert (ranks[0]["scores"] > 0).tolist() == (one > 0).tolist()
    assert ranks[0]["pruned"] == single.pruned_count
    # metrics are over the whole test set and all ranks, not rank 0's shard
    assert ranks[0]["history"]["test_accuracy"] == pytest.approx(single.history.test_accuracy, abs=1.5 / 90)
    assert ranks[0]["history"]["train_loss"] == pytest.approx(single.history.train_loss, rel=1e-3)


def test_ddp_resume_after_interruption_equals_uninterrupted(tmp_path):
    cfg_kwargs = TINY | {"sync_bn": True}
    full = _spawn(tmp_path, "full", cfg_kwargs)
    cut = _spawn(tmp_path, "cut", cfg_kwargs, interrupt_after=1)
    assert all(r.get("interrupted") for r in cut)
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    resumed = _spawn(tmp_path, "cut", cfg_kwargs)
    assert torch.equal(resumed[0]["scores"], full[0]["scores"])
    assert resumed[0]["history"] == full[0]["history"]


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
        trainer._check_world(trainer.PruneConfig(batch_size=2), info)
    assert dist_mod.shard(10, dist_mod.DistInfo(rank=1, world_size=3)) == slice(4, 7)
    assert dist_mod.shard(2, dist_mod.DistInfo(rank=0, world_size=3)) is None


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_run_extracts_a_matching_model(tmp_path, amp):
    cfg = trainer.PruneConfig(**(TINY | {"amp": amp, "channels_last": True, "epochs": 2}))
    res = trainer.run_prune(cfg, tmp_path / amp, progress=False)
    bank = find_bank(res.gated_model)
    assert torch.isfinite(bank.scores).all()
    gates = torch.cat(bank.gates())
    assert set(gates.unique().tolist()) <= {0.0, 1.0}              # exactly binary
    x = res.data.test_x[:32].contiguous(memory_format=torch.channels_last)
    res.gated_model.eval()
    res.pruned_model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=trainer.AMP_DTYPES[amp]):
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
        trainer.PruneConfig(amp="int8").validate()
