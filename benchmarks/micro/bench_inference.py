"""Inference: unpruned ResNet vs extracted at 30%, 50% and 70% of the MACs removed.

The extracted models come from attach_gates + a fixed seeded gate rule
(common.close_for_macs: every channel group keeps the same fraction, rounded
to the setting's round_to) + extract, so runs are comparable. Latency of one
batch, throughput, params and MACs; energy per image where a counter exists.
On a GPU the models run in the setting's dtype (bf16) and channels_last.

    .venv/bin/python -m pytest benchmarks/micro/bench_inference.py -c benchmarks/micro/pytest.ini
"""
import pytest
import torch

import common
import polarprune_cuda as pp

VARIANTS = ("unpruned",) + tuple(f"extracted-{int(100 * r)}" for r in common.MACS_REMOVED)


def _model(model: str, variant: str, setting):
    if variant == "unpruned":
        net = common.build(model)
        example = torch.randn(1, 3, setting.size, setting.size)
        counts = pp.count(net, example)
        return net, counts, counts
    return common.extracted(setting, int(variant.split("-")[1]) / 100)


def _forward(model: str, variant: str, setting, device):
    """``(forward, counts...)``: a no-grad forward of one batch in the setting's dtype and memory format."""
    net, dense, counts = _model(model, variant, setting)
    net = common.place(net, setting, device).eval()
    if setting.dtype != "float32":
        net = net.to(getattr(torch, setting.dtype))
    x, _ = common.batch(setting, device)
    x = x.to(next(net.parameters()).dtype)

    @torch.inference_mode()
    def forward():
        return net(x)

    return forward, dense, counts


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model", common.MODELS)
def test_inference(benchmark, model, variant, model_settings, device, rounds, energy_probe):
    setting = model_settings[model]
    benchmark.group = f"inference: {model}, batch {setting.batch}, {setting.size}x{setting.size}"
    forward, dense, counts = _forward(model, variant, setting, device)

    def run():
        forward()
        common.sync(device)

    benchmark.extra_info.update(kind="inference", model=model, variant=variant, setting=setting.to_dict(),
                                params=counts["params"], macs=counts["macs"], dense_params=dense["params"],
                                dense_macs=dense["macs"], macs_removed=1 - counts["macs"] / dense["macs"])
    benchmark.pedantic(run, rounds=rounds(30), warmup_rounds=3 if device.type == "cpu" else 10, iterations=1)
    energy_probe(benchmark, forward, items=setting.batch)
    out = forward()
    assert out.shape == (setting.batch, common.NUM_CLASSES) and bool(torch.isfinite(out.float()).all())


@pytest.mark.parametrize("model", common.MODELS)
def test_inference_side_by_side(benchmark, model, model_settings, device, rounds):
    setting = model_settings[model]
    benchmark.group = f"inference, variants interleaved: {model}"
    fns = {v: _forward(model, v, setting, device)[0] for v in VARIANTS}
    round_fn, times = common.interleaved(fns, device)
    warmup = 3
    benchmark.pedantic(round_fn, rounds=rounds(40), warmup_rounds=warmup, iterations=1)
    stats = {v: common.time_stats(ts[warmup:] if len(ts) > warmup else ts) for v, ts in times.items()}
    benchmark.extra_info.update(kind="inference-interleaved", model=model, setting=setting.to_dict(), variants=stats)
