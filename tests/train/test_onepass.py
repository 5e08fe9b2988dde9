"""OnePass: the one-pass recipe in a user's own loop, any optimizer of torch.optim.

What is asserted holds by construction on every machine: the budget's exact target (counts), the switch against
continuing on the gated model after two steps in float64, resume bit for bit on one machine, the refusals.
"""
import contextlib
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import polarprune_cuda as pp
from polarprune_cuda.models import build_model
from polarprune_cuda import split_parameters
from polarprune_cuda.train.onepass import CARRIED, OnePass, check_gate_group

STEPS = 24


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = build_model("resnet20", 10, 1, False).to(dtype)
    x = torch.randn(1, 1, 8, 8, dtype=dtype)
    pp.attach_gates(model, x, min_channels=2)
    return model, x


def _batches(n, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 1, 8, 8, generator=g, dtype=dtype), torch.randint(0, 10, (16,), generator=g))
            for _ in range(n)]


def _optimizer(kind, model, window):
    w, s = split_parameters(model)
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[kind]
    lr = OnePass.gate_lr(cls, window, s[0].numel()) * (max(2.0, 12 / window) if kind == "sgd" else 2.0)
    if kind == "sgd":
        return cls([{"params": w}, {"params": s, "lr": lr, "weight_decay": 0.0}], lr=0.05, momentum=0.9,
                   nesterov=True, weight_decay=5e-4)
    return cls([{"params": w}, {"params": s, "lr": lr, "weight_decay": 0.0}], lr=1e-3,
               weight_decay=0.05 if kind == "adamw" else 0.0)


def _run(pruner, opt, sched, batches, start=0, stop=None):
    for x, y in batches[start:stop]:
        loss = F.cross_entropy(pruner.model(x), y) + pruner.penalty()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        pruner.step()


@contextlib.contextmanager
def _quiet():
    """The freeze warning of these short runs (their scores barely train) is not what they test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.mark.parametrize("cost", ["macs", "params"])
@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
def test_a_user_loop_meets_the_target_with_any_optimizer(kind, cost):
    model, x = _model()
    opt = _optimizer(kind, model, 8)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, STEPS)
    with _quiet():
        pruner = OnePass(model, x, 0.5, STEPS, opt, sched, cost=cost, freeze_at=0.5)
        _run(pruner, opt, sched, _batches(STEPS))
    small = pruner.finish()
    assert pruner.switched and small is pruner.model
    dense, got = pruner.budget["total"], pp.count(small, x)[cost]
    assert abs(1 - got / dense - 0.5) <= 0.005, (got, dense)
    assert abs(pruner.budget["achieved_sparsity"] - 0.5) <= 0.005
    # the optimizer now holds the extracted network's parameters, its state of their shapes
    held = [p for g in opt.param_groups for p in g["params"]]
    assert {id(p) for p in held} == {id(p) for p in small.parameters()}
    assert all(v.shape == p.shape for p in held for v in opt.state[p].values() if v.dim() > 0)
    # the gated model got the trained weights back: it computes what the extracted network does
    model.eval(), small.eval()
    xb = _batches(1)[0][0]
    torch.testing.assert_close(model(xb), small(xb), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_the_switch_equals_continuing_on_the_gated_model(kind):
    """float64: two steps before the freeze and two after, with the switch and without; the extracted network's
    outputs, weights and every optimizer state tensor equal the gated run's kept elements."""
    batches = _batches(6, torch.float64)
    runs = {}
    for switch in (True, False):
        model, x = _model(torch.float64)
        opt = _optimizer(kind, model, 4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 6)
        with _quiet():
            pruner = OnePass(model, x, 0.5, 6, opt, sched, freeze_at=0.7, warmup=0.0, ramp=0.0, switch=switch)
            _run(pruner, opt, sched, batches)
        runs[switch] = (pruner, opt)
    (a, opt_a), (b, opt_b) = runs[True], runs[False]
    assert a.switched and not b.switched and a.budget == b.budget
    xb = batches[0][0]
    a.model.eval(), b.model.eval()
    torch.testing.assert_close(a.model(xb), b.model(xb), rtol=1e-10, atol=1e-12)
    names_b = dict(b.model.named_parameters())
    from polarprune_cuda.train.switch import _gather
    compared = 0
    for name, p in a.model.named_parameters():
        q = names_b[name]
        want = _gather(q, a.maps[name]) if name in a.maps else q
        torch.testing.assert_close(p, want.view(p.shape), rtol=1e-10, atol=1e-12)
        for key, v in opt_a.state[p].items():
            w = opt_b.state[q][key]
            if v.dim() > 0:
                w = _gather(w, a.maps[name]) if name in a.maps else w
                compared += 1
            torch.testing.assert_close(v, w.view(v.shape), rtol=1e-10, atol=1e-12)
    assert compared >= len(list(a.model.parameters()))


def test_the_gate_group_is_never_wrong_silently():
    model, x = _model()
    # AdamW over model.parameters(): the scores share the weights' group (the gates would barely move)
    with pytest.raises(ValueError, match="share parameter group 0 with .* other parameters.*split_parameters"):
        OnePass(model, x, 0.5, 100, torch.optim.AdamW(model.parameters(), lr=1e-3))
    w, s = split_parameters(model)
    with pytest.raises(ValueError, match="weight_decay=0.01.*set it to 0.0"):
        OnePass(model, x, 0.5, 100, torch.optim.AdamW([{"params": w}, {"params": s}], lr=1e-3))
    with pytest.raises(ValueError, match="cannot move a score by 1 in the 22 steps"):
        OnePass(model, x, 0.5, 100, torch.optim.Adam([{"params": w}, {"params": s, "lr": 1e-3}], lr=1e-3))
    opt = torch.optim.Adam(w, lr=1e-3)                           # no group for the scores: added, said so
    with pytest.warns(UserWarning, match="no parameter group for the .* gate scores.*added one"):
        OnePass(model, x, 0.5, 100, opt)
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["params"][0] is s[0]
    assert opt.param_groups[1]["weight_decay"] == 0.0
    assert opt.param_groups[1]["lr"] == pytest.approx(OnePass.gate_lr(torch.optim.Adam, 22, s[0].numel()))
    with pytest.raises(ValueError, match="LBFGS: its state cannot be carried"):
        OnePass(model, x, 0.5, 100, torch.optim.LBFGS(model.parameters()))
    with pytest.raises(ValueError, match="total_steps must be an int >= 1"):
        OnePass(model, x, 0.5, 0, torch.optim.SGD(w, lr=0.1))
    assert "AdamW" in CARRIED and "SGD" in CARRIED
    assert check_gate_group(opt, s[0], 22, 0.5) == 1


def test_the_scores_move_only_between_warmup_and_freeze():
    model, x = _model()
    opt = _optimizer("adam", model, 8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    with _quiet():
        pruner = OnePass(model, x, 0.5, STEPS, opt, sched, freeze_at=0.5, warmup=0.25, switch=False)
    scores = pp.find_bank(model).scores
    seen = [scores.detach().clone()]
    batches = _batches(STEPS)
    for i in range(STEPS):
        with _quiet():
            _run(pruner, opt, sched, batches, start=i, stop=i + 1)
        seen.append(scores.detach().clone())
    moved = [not torch.equal(a, b) for a, b in zip(seen, seen[1:])]
    # steps 0-5: warm-up, still; 6-10 move; step 11 moves and ends at the freeze, where the budget sets them;
    # then still
    assert moved[:6] == [False] * 6 and all(moved[6:12]) and moved[12:] == [False] * (STEPS - 12)


def test_freezing_on_untrained_scores_is_said_out_loud():
    """A gate rate that barely moves the scores: at the freeze (none polarized) OnePass warns, naming the fixes."""
    model, x = _model()
    w, s = split_parameters(model)
    opt = torch.optim.Adam([{"params": w}, {"params": s, "lr": 1.5 / 10, "weight_decay": 0.0}], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    pruner = OnePass(model, x, 0.5, STEPS, opt, sched, freeze_at=0.5, warmup=1 / 12)
    with pytest.warns(UserWarning, match=r"freeze at step 12 with 0.0% of them polarized.*freeze later"):
        _run(pruner, opt, sched, _batches(STEPS))
    assert pruner.polarized_at_freeze == 0.0 and abs(pruner.budget["achieved_sparsity"] - 0.5) <= 0.005


def test_evaluate_takes_a_dataloader_or_tensors():
    from torch.utils.data import DataLoader, TensorDataset

    model, _ = _model()
    x = torch.randn(70, 1, 8, 8)
    y = torch.randint(0, 10, (70,))
    model.train()
    by_tensors = pp.evaluate(model, x, y, batch_size=32)
    by_loader = pp.evaluate(model, DataLoader(TensorDataset(x, y), batch_size=32))   # the same batches
    assert by_loader == by_tensors and model.training
    with torch.no_grad():
        model.eval()
        want = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in zip(x.split(32), y.split(32))) / 70
    assert by_loader == want
    with pytest.raises(TypeError, match="tensors x and y, or an iterable"):
        pp.evaluate(model, x)


def test_gradient_accumulation_and_bf16_autocast():
    """Two micro-batches per optimizer step (one pruner.step per optimizer step), the forward under bf16 autocast
    with a GradScaler (disabled on the CPU, as a CPU user writes it): the target and the switch as without."""
    model, x = _model()
    opt = _optimizer("adamw", model, 8)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, STEPS)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batches = _batches(2 * STEPS)
    with _quiet():
        pruner = OnePass(model, x, 0.5, STEPS, opt, sched, cost="macs", freeze_at=0.5)
        for i in range(STEPS):
            opt.zero_grad(set_to_none=True)
            for xb, yb in batches[2 * i: 2 * i + 2]:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    logits = pruner.model(xb)
                loss = (F.cross_entropy(logits.float(), yb) + pruner.penalty()) / 2
                scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            pruner.step()
    small = pruner.finish()
    assert pruner.switched and pruner.steps == STEPS and pruner.loss.step == 0   # explicit steps, no counter
    assert abs(1 - pp.count(small, x)["macs"] / pruner.budget["total"] - 0.5) <= 0.005
    assert all(torch.isfinite(p).all() for p in small.parameters())


def test_torch_compile_of_the_model_before_and_after_the_switch():
    """pruner.model compiled (fullgraph), and compiled again when the switch hands the extracted network: every
    step's loss is the eager loop's (one step after the same weights: compiled and eager kernels differ only in
    float rounding), the target met and the same network extracted."""
    steps, losses = 4, {}
    for mode in ("eager", "compiled"):
        torch._dynamo.reset()
        model, x = _model(torch.float64)
        opt = _optimizer("sgd", model, 1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        with _quiet():
            pruner = OnePass(model, x, 0.5, steps, opt, sched, freeze_at=0.5, warmup_steps=0)
        run = pruner.model if mode == "eager" else torch.compile(pruner.model, fullgraph=True, backend="aot_eager")
        losses[mode] = []
        for xb, yb in _batches(steps, torch.float64):
            loss = F.cross_entropy(run(xb), yb) + pruner.penalty()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            was = pruner.switched
            with _quiet():
                pruner.step()
            if pruner.switched and not was:
                run = pruner.model if mode == "eager" else torch.compile(pruner.model, fullgraph=True,
                                                                         backend="aot_eager")
            losses[mode].append(float(loss.detach().as_subclass(torch.Tensor)))
        assert pruner.switched
        losses[mode + " spec"] = pruner.finish().polarprune_spec
    assert losses["compiled spec"] == losses["eager spec"]
    torch.testing.assert_close(losses["compiled"], losses["eager"], rtol=1e-9, atol=1e-9)


def _ddp_worker(rank, world, port, out):
    import os

    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, x = _model()
        opt = _optimizer("adamw", model, 6)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 12)
        wrapped = []

        def wrap(m):
            wrapped.append(m)
            return DDP(m)

        with _quiet():
            pruner = OnePass(model, x, 0.5, 12, opt, sched, freeze_at=0.5, warmup=0.25, wrap=wrap)
            _run(pruner, opt, sched, _batches(12, seed=10 + rank))     # every rank its own data
        small = pruner.finish()
        torch.save({"state": dict(small.named_parameters()), "scores": pruner.bank.scores.detach().clone(),
                    "budget": pruner.budget, "wrapped": [m is pruner.gated for m in wrapped],
                    "ddp": isinstance(pruner.model, DDP) and pruner.model.module is small},
                   f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_wrapper_follows_the_network_and_the_ranks_agree(tmp_path):
    """Two gloo ranks, each its own batches: the wrapper is rebuilt when the scores start training and around
    the extracted network at the switch; gradients are averaged, so both ranks end with the same scores, budget
    and extracted weights, bit for bit (exact by construction; BatchNorm's running statistics are each rank's
    own after the last forward, as DDP leaves them)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["wrapped"] == [True, True, False]    # at the start, when the scores start training, the switch
    assert r0["ddp"] and r1["ddp"]
    assert torch.equal(r0["scores"], r1["scores"]) and not torch.equal(r0["scores"], torch.ones_like(r0["scores"]))
    assert r0["budget"] == r1["budget"]
    assert r0["state"].keys() == r1["state"].keys()
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), k


def test_the_cli_trainer_is_a_user_of_onepass(tmp_path, monkeypatch):
    """One implementation: a CLI run builds one OnePass, whose freeze meets the target (the only meet_target
    call) and whose switch the run trains on; the run's budget is the recipe's."""
    from polarprune_cuda.train import onepass
    from polarprune_cuda import train

    built, met = [], []
    init, meet = onepass.OnePass.__init__, onepass.meet_target

    def counting_init(self, *a, **k):
        built.append(self)
        init(self, *a, **k)

    monkeypatch.setattr(onepass.OnePass, "__init__", counting_init)
    monkeypatch.setattr(onepass, "meet_target", lambda *a, **k: met.append(a) or meet(*a, **k))
    cfg = train.PruneConfig(dataset="digits", max_train=128, max_test=64, batch_size=32, epochs=2,
                              warmup_epochs=0.0, ramp_epochs=0.5, min_channels=2, seed=1)
    with _quiet():
        res = train.run_prune(cfg, tmp_path, progress=False)
    assert len(built) == 1 and len(met) == 1
    rec = built[0]
    assert rec.switched and rec.steps == 8 and rec.freeze_step == 2
    assert res.history.budget == rec.budget and res.history.switch_step == [2]


def _lambda_cosine(opt, total):
    import math
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))


@pytest.mark.parametrize("make", [lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, STEPS),
                                  lambda opt: _lambda_cosine(opt, STEPS)], ids=["cosine", "lambda"])
def test_resume_across_the_switch_is_bit_identical_and_the_schedule_restarts(make):
    """The schedule starts again at the freeze (step 12 of 24: the base lr; 6 steps later the cosine's middle);
    a run saved at step 16 and resumed ends with the uninterrupted run's weights, bit for bit."""
    batches = _batches(STEPS)

    def build():
        model, x = _model()
        opt = _optimizer("adamw", model, 8)
        sched = make(opt)
        return OnePass(model, x, 0.5, STEPS, opt, sched, freeze_at=0.5), opt, sched

    with _quiet():
        whole, opt_w, sched_w = build()
        _run(whole, opt_w, sched_w, batches, stop=12)
        assert whole.switched and opt_w.param_groups[0]["lr"] == pytest.approx(1e-3, rel=1e-12)
        _run(whole, opt_w, sched_w, batches, start=12, stop=18)
        assert opt_w.param_groups[0]["lr"] == pytest.approx(0.5e-3, rel=1e-9)
        _run(whole, opt_w, sched_w, batches, start=18)
        part, opt_p, sched_p = build()
        _run(part, opt_p, sched_p, batches, stop=16)              # past the freeze: switched
        saved = copy.deepcopy({"pruner": part.state_dict(), "optimizer": opt_p.state_dict(),
                               "scheduler": sched_p.state_dict()})
        again, opt_r, sched_r = build()
        again.load_state_dict(saved["pruner"])
        opt_r.load_state_dict(saved["optimizer"])
        sched_r.load_state_dict(saved["scheduler"])
        _run(again, opt_r, sched_r, batches, start=16)
    assert part.switched and again.switched and again.steps == whole.steps == STEPS
    assert opt_r.param_groups[0]["lr"] == opt_w.param_groups[0]["lr"]
    for (n1, t1), (n2, t2) in zip(whole.model.state_dict().items(), again.model.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2), n1


def test_a_schedule_that_cannot_restart_is_refused_by_name():
    model, x = _model()
    opt = _optimizer("adamw", model, 8)
    sched = torch.optim.lr_scheduler.StepLR(opt, 8)
    with pytest.raises(ValueError, match="restart_schedule: OnePass restarts a LambdaLR or a CosineAnnealingLR at "
                                         "the freeze, not a StepLR; pass restart_schedule=False"):
        OnePass(model, x, 0.5, STEPS, opt, sched, freeze_at=0.5)
    with _quiet():
        OnePass(model, x, 0.5, STEPS, opt, sched, freeze_at=0.5, restart_schedule=False)


def test_pretrained_ranks_the_scores_and_freezes_at_once_without_a_warning():
    """OnePass(pretrained=True): what polarprune prune --init does, in a user's loop: the scores ranked by the
    group L2 magnitude, no warm-up, the gates frozen at 1% of the run; no refusal of a gate rate that could not
    train them and no warning that they barely trained (that is the recipe)."""
    import copy
    import warnings

    torch.manual_seed(0)
    model = pp.resnet20(num_classes=10, in_channels=1)
    x = torch.randn(2, 1, 8, 8)
    ranked = copy.deepcopy(model)
    pp.attach_gates(ranked, x, min_channels=2)
    pp.scores_from_magnitude(ranked)
    pp.attach_gates(model, x, min_channels=2)
    weights, scores = pp.split_parameters(model)
    opt = torch.optim.SGD([{"params": weights}, {"params": scores, "lr": 1e-3, "weight_decay": 0.0}], lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pruner = pp.OnePass(model, x, 0.5, 300, opt, pretrained=True)
        assert torch.equal(pp.find_bank(model).scores.detach(), pp.find_bank(ranked).scores.detach())
        assert pruner.freeze_step == 3 and pruner.warmup_steps == 0
        for _ in range(3):
            pruner.step()
    assert pruner.budget is not None and abs(pruner.budget["achieved_sparsity"] - 0.5) <= 0.005
    other = pp.attach_gates(pp.resnet20(num_classes=10, in_channels=1), x, min_channels=2)
    weights, scores = pp.split_parameters(other)
    with pytest.raises(ValueError, match="gate scores' learning rate"):   # a freeze given: the gates must train
        pp.OnePass(other, x, 0.5, 300, torch.optim.SGD([{"params": weights},
                                                        {"params": scores, "lr": 1e-3, "weight_decay": 0.0}], lr=0.1),
                   pretrained=True, freeze_at=0.3)
    # ranked_freeze=True says the same of any given freeze: a freeze at step 0 warns of nothing (what the CLI's
    # --init passes); False warns as from scratch
    for ranked, expect in ((True, "error"), (False, "default")):
        m = pp.attach_gates(pp.resnet20(num_classes=10, in_channels=1), x, min_channels=2)
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter(expect)
            pp.OnePass(m, x, 0.5, 300, torch.optim.SGD(m.parameters(), lr=0.1), freeze_at=0.0, check_group=False,
                       ranked_freeze=ranked)
        assert ranked or any("barely trained" in str(w.message) for w in got)
    with pytest.raises(TypeError, match="ranked_freeze must be True, False or None"):
        pp.OnePass(m, x, 0.5, 300, torch.optim.SGD(m.parameters(), lr=0.1), ranked_freeze=1)
