"""Training step: unpruned ResNet vs gated the naive way vs gated with polarprune, side by side.

One step = forward, cross-entropy (+ the gate penalty for the gated variants),
backward and an SGD update, on the same fixed batch. Batch sizes, input sizes
and dtypes: common.settings (on a GPU: bf16 autocast, channels_last).

Two kinds of benchmark: one per variant (pytest-benchmark's statistics, and
the energy per step), and one per model that runs the three variants
interleaved round by round; the headline ratios come from the interleaved one.

    .venv/bin/python -m pytest benchmarks/micro/bench_training.py -c benchmarks/micro/pytest.ini
"""
import pytest

import common

VARIANTS = ("unpruned", "naive", "polarprune")


def _check_grads(net):
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads), "every parameter (gate scores included) got a gradient"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model", common.MODELS)
def test_training_step(benchmark, model, variant, model_settings, device, rounds, energy_probe):
    setting = model_settings[model]
    benchmark.group = f"training step: {model}, batch {setting.batch}, {setting.size}x{setting.size}"
    step, net = common.training_step(variant, setting, device)

    def run():
        step()
        common.sync(device)

    benchmark.extra_info.update(kind="training", model=model, variant=variant, setting=setting.to_dict())
    benchmark.pedantic(run, rounds=rounds(20), warmup_rounds=3 if device.type == "cpu" else 5, iterations=1)
    energy_probe(benchmark, step, items=setting.batch)
    _check_grads(net)


@pytest.mark.parametrize("model", common.MODELS)
def test_training_side_by_side(benchmark, model, model_settings, device, rounds):
    setting = model_settings[model]
    benchmark.group = f"training step, variants interleaved: {model}"
    nets = {}
    steps = {}
    for v in VARIANTS:
        steps[v], nets[v] = common.training_step(v, setting, device)
    round_fn, times = common.interleaved(steps, device)
    warmup = 2
    benchmark.pedantic(round_fn, rounds=rounds(20), warmup_rounds=warmup, iterations=1)
    stats = {v: common.time_stats(ts[warmup:] if len(ts) > warmup else ts) for v, ts in times.items()}
    benchmark.extra_info.update(kind="training-interleaved", model=model, setting=setting.to_dict(), variants=stats)
    for net in nets.values():
        _check_grads(net)
