"""Green training: once the gates freeze, the run trains the extracted network (train/switch.py), carrying the
weights, the momentum buffers, the learning rates and the schedule over; checkpoints after the switch hold the
extracted network and its spec; the report accounts for the training's MACs, time and energy."""
import json

import pytest
import torch
import torch.nn.functional as F

import polarprune_cuda as pp
from polarprune_cuda.surgery.budget import meet_target
from polarprune_cuda.surgery.extract import index_maps
from polarprune_cuda.train import switch as switch_mod
from polarprune_cuda import train
from polarprune_cuda.train.loop import TRAIN_MACS_FACTOR
from polarprune_cuda.train.optim import lr_lambdas, make_optimizer

from helpers import float64_runs, gated_resnet20, without_clock

# 64 images, batches of 16: 4 steps an epoch, 8 in all; the gates freeze at step 3 (0.4 of 8), in epoch 1
TINY = dict(dataset="digits", model="resnet20", max_train=64, max_test=48, batch_size=16, epochs=2,
            warmup_epochs=0.0, ramp_epochs=0.5, freeze_gates_at=0.4, min_channels=2, seed=5)


def _gated_resnet(seed=0):
    """gated_resnet20 with some gates closed by an exact budget."""
    model, x = gated_resnet20(seed)
    meet_target(model, 0.5, "macs")
    return model, x


def _step(model, opt, sched, xb, yb):
    loss = F.cross_entropy(model(xb), yb)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()


def test_index_maps_say_where_every_extracted_element_comes_from():
    model, x = _gated_resnet()
    small = pp.extract(model, x)
    maps = index_maps(model)
    big = model.state_dict()
    assert set(maps) == {k for k, v in small.state_dict().items() if v.is_floating_point()}
    narrower = 0
    for name, t in small.state_dict().items():
        if name not in maps:
            assert torch.equal(t, big[name]), name   # integer buffers (BatchNorm's count) come whole
            continue
        idx = maps[name]
        assert idx.shape == t.shape and int(idx.min()) >= 0   # the budget keeps every guard: no zeroed element
        assert torch.equal(big[name].reshape(-1)[idx.reshape(-1)].view(t.shape), t), name
        narrower += t.numel() < big[name].numel()
    assert narrower > 10                           # channels were removed in many tensors


def test_switch_equals_continuing_on_the_gated_model():
    """Two steps with the gates frozen build momentum; then the gated model and its switched extraction take
    the same three steps. Weights, momentum buffers and learning rates agree to float64 rounding."""
    model, x = _gated_resnet()
    opt = make_optimizer(model, 0.1)
    freeze = 2
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambdas(10, freeze, 0)[: len(opt.param_groups)])
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 1, 8, 8, generator=gen, dtype=torch.float64), torch.randint(0, 10, (8,), generator=gen))
               for _ in range(5)]
    for xb, yb in batches[:2]:
        _step(model, opt, sched, xb, yb)
    scores = pp.find_bank(model).scores.detach().clone()
    sw = switch_mod.switch(model, opt, sched, x)
    small, maps = sw.model, sw.maps
    before = {n: p.detach().clone() for n, p in small.named_parameters()}
    for xb, yb in batches[2:]:
        _step(model, opt, sched, xb, yb)
        _step(small, sw.optimizer, sw.scheduler, xb, yb)
    assert torch.equal(pp.find_bank(model).scores.detach(), scores)   # the gates stayed frozen (lr 0 after freeze)
    big = dict(model.named_parameters())
    moved = 0
    for name, p in small.named_parameters():
        want = big[name].detach().reshape(-1)[maps[name].reshape(-1)].view(p.shape)
        torch.testing.assert_close(p.detach(), want, rtol=1e-10, atol=1e-12, msg=name)
        got_buf = sw.optimizer.state[p]["momentum_buffer"]
        want_buf = opt.state[big[name]]["momentum_buffer"].reshape(-1)[maps[name].reshape(-1)].view(p.shape)
        torch.testing.assert_close(got_buf, want_buf, rtol=1e-10, atol=1e-12, msg=name)
        moved += not torch.equal(p.detach(), before[name])
    assert moved > 10                              # the steps after the switch trained the extracted network
    assert [g["lr"] for g in sw.optimizer.param_groups] == [g["lr"] for g in opt.param_groups]
    assert sw.scheduler.last_epoch == sched.last_epoch == 5
    assert sw.optimizer.param_groups[1]["params"] == []   # the gate scores' group stays, empty
    with torch.no_grad():   # and the two networks compute the same function (eval mode, BatchNorm statistics)
        model.eval(), small.eval()
        torch.testing.assert_close(small(batches[0][0]), model(batches[0][0]), rtol=1e-9, atol=1e-9)


def test_write_back_makes_the_gated_model_compute_the_extracted_one():
    model, x = _gated_resnet(seed=2)
    small = pp.extract(model, x)
    maps = index_maps(model)
    with torch.no_grad():
        for p in small.parameters():
            p.add_(torch.randn_like(p))
    switch_mod.write_back(small, model, maps)
    model.eval(), small.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), small(x), rtol=1e-9, atol=1e-9)


def test_run_with_switch_equals_the_gated_run(tmp_path, monkeypatch):
    """The whole run (float64): the switched one and --keep-gated take the same 8 steps, 5 of them after the
    freeze; the final weights agree to float64 rounding, the switched run computed fewer MACs."""
    float64_runs(monkeypatch.setattr)
    kept = train.run_prune(train.PruneConfig(**TINY, keep_gated=True), tmp_path / "kept", progress=False)
    moved = train.run_prune(train.PruneConfig(**TINY), tmp_path / "moved", progress=False)
    a, b = kept.gated_model.state_dict(), moved.gated_model.state_dict()
    maps = index_maps(moved.gated_model)
    for name, idx in maps.items():   # the elements the extracted network carries
        flat = idx.reshape(-1)
        torch.testing.assert_close(b[name].reshape(-1)[flat], a[name].reshape(-1)[flat], rtol=1e-9, atol=1e-10,
                                   msg=name)
    assert kept.pruned_count == moved.pruned_count
    assert moved.history.switch_step == [3] and kept.history.switch_step == []
    assert moved.history.macs_trace[0] == kept.history.macs_trace[0]
    assert moved.history.macs_trace[1] == [3, moved.pruned_count["macs"]]
    assert sum(moved.history.epoch_macs) < sum(kept.history.epoch_macs)
    assert moved.history.density == kept.history.density
    assert moved.history.test_accuracy == pytest.approx(kept.history.test_accuracy, abs=1 / 48 + 1e-12)


def test_resume_across_the_switch_equals_the_uninterrupted_run(tmp_path):
    """The checkpoint after epoch 1 is written after the switch (step 3): it holds the extracted network, its
    spec and the gated model; resuming from it gives the uninterrupted run bit for bit."""
    cfg = train.PruneConfig(**TINY)
    full = train.run_prune(cfg, tmp_path / "full", progress=False)
    with pytest.raises(KeyboardInterrupt):
        train.run_prune(cfg, tmp_path / "cut", progress=False, interrupt_after=1)
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and {"spec", "gated_model"} <= set(ckpt)
    small_keys = {k: list(v.shape) for k, v in ckpt["model"].items()}
    assert small_keys == ckpt["spec"]["shapes"]                       # "model" is the extracted network
    assert any(small_keys[k] != list(v.shape) for k, v in ckpt["gated_model"].items() if k in small_keys)
    resumed = train.run_prune(cfg, tmp_path / "cut", progress=False, resume=True)
    for k, v in full.gated_model.state_dict().items():
        assert torch.equal(v, resumed.gated_model.state_dict()[k]), k
    for k, v in full.pruned_model.state_dict().items():
        assert torch.equal(v, resumed.pruned_model.state_dict()[k]), k
    assert without_clock(full.history) == without_clock(resumed.history)
    assert full.pruned_accuracy == resumed.pruned_accuracy


def test_switched_checkpoint_with_another_spec_is_refused(tmp_path, capsys):
    cfg = train.PruneConfig(**TINY)
    with pytest.raises(KeyboardInterrupt):
        train.run_prune(cfg, tmp_path / "cut", progress=False, interrupt_after=1)
    path = tmp_path / "cut" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    state["spec"]["groups"][0]["kept"] = state["spec"]["groups"][0]["kept"][1:]
    train.Checkpointer(path).save(state)
    with pytest.raises(pp.errors.CheckpointError, match="field 'spec' does not match the gated model"):
        train.run_prune(cfg, tmp_path / "cut", progress=False, resume=True)
    with pytest.raises(pp.errors.CheckpointError, match="keep_gated"):   # the other path is another recipe
        train.run_prune(train.PruneConfig(**TINY, keep_gated=True), tmp_path / "cut", progress=False,
                          resume=True)


def test_report_accounts_for_the_training(tmp_path, capsys):
    """report.json "training": the dense baseline's MACs are exactly steps x the dense step's; the run's are the
    MACs trace summed over its steps; times are positive; the ratios are run / baseline."""
    from polarprune_cuda.cli import main

    out = tmp_path / "run"
    args = ["prune", "--out", str(out), "--baseline", "--device", "cpu", "--quiet"]
    for k, v in TINY.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    t = report["training"]
    steps = TINY["epochs"] * TINY["max_train"] // TINY["batch_size"]
    per_step = TRAIN_MACS_FACTOR * TINY["batch_size"]
    assert t["baseline"]["macs"] == steps * per_step * report["dense"]["macs"]
    trace = report["history"]["macs_trace"]
    assert trace == [[0, report["dense"]["macs"]], [3, report["pruned"]["macs"]]]
    assert t["run"]["macs"] == per_step * (3 * trace[0][1] + (steps - 3) * trace[1][1])
    assert t["run"]["switch_step"] == 3 and t["baseline"]["switch_step"] is None
    assert t["run"]["seconds"] > 0 and t["baseline"]["seconds"] > 0
    assert t["ratio"]["macs"] == pytest.approx(t["run"]["macs"] / t["baseline"]["macs"], rel=1e-12)
    assert t["ratio"]["seconds"] == pytest.approx(t["run"]["seconds"] / t["baseline"]["seconds"], rel=1e-12)
    if t["run"]["joules"] is None:
        assert t["run"]["energy"] and t["ratio"]["joules"] is None   # the reason no counter was read
    assert "macs.png" in report["files"] and (out / "macs.png").stat().st_size > 0
    md = (out / "report.md").read_text()
    assert "Training cost:" in md and "training MACs" in md and "macs.png" in md
