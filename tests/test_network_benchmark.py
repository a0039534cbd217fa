"""``benchmarks/network.py`` splits the network step by operator and counts its convolution FLOPs;
the figures back the README's account of the end-to-end ceiling, so they are checked here against
independent computations."""
import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load_network_script():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location("benchmark_network", BENCHMARKS / "network.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


network = _load_network_script()


def _conv_flops_by_hand(model: torch.nn.Module, views: torch.Tensor) -> tuple[float, float]:
    """(forward, backward) FLOPs of every convolution from its output shape: 2 x outputs x C_in/groups
    x kernel area forward; the backward makes the weight gradient for each and the input gradient for
    all but the first convolution, whose input (the images) needs none."""
    forward, first = [], []

    def hook(module, inputs, output):
        kh, kw = module.kernel_size
        flops = 2 * output.numel() * module.in_channels // module.groups * kh * kw
        forward.append(flops)
        if not inputs[0].requires_grad:
            first.append(flops)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    model(views)
    for handle in handles:
        handle.remove()
    return float(sum(forward)), float(2 * sum(forward) - sum(first))


def test_convolution_flops_of_the_embedded_step_match_a_count_from_the_layer_shapes():
    step = network.make_step("embedded", "reference", batch_size=2)
    _, flops = network.profile_step(step.run, steps=1)
    forward, backward = _conv_flops_by_hand(step.model, step.views)
    assert flops["conv_forward"] == pytest.approx(forward)
    assert flops["conv_backward"] == pytest.approx(backward)


@pytest.mark.parametrize("side", ["reference", "ours"])
def test_every_operator_the_phases_name_occurs_in_a_profiled_step(side):
    # A phase whose operators PyTorch renamed would silently read 0 ms.
    from torch.profiler import ProfilerActivity, profile

    step = network.make_step("embedded", side, batch_size=2)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step.run()
    seen = {event.key for event in prof.key_averages()}
    assert {op for ops in network.PHASE_OPS.values() for op in ops} <= seen


def test_phase_times_add_up_each_phases_operators_per_step_and_ignore_the_others():
    rows = [SimpleNamespace(key="aten::convolution", cpu_time_total=6000.0),
            SimpleNamespace(key="aten::convolution_backward", cpu_time_total=9000.0),
            SimpleNamespace(key="aten::native_batch_norm", cpu_time_total=1500.0),
            SimpleNamespace(key="aten::native_batch_norm_backward", cpu_time_total=3000.0),
            SimpleNamespace(key="aten::relu_", cpu_time_total=99999.0)]
    assert network.phase_times_ms(rows, steps=3) == pytest.approx(
        {"conv_forward": 2.0, "conv_backward": 3.0, "batch_norm": 1.5})


def test_flops_by_phase_reads_the_counters_keys_by_operator_name():
    counts = {torch.ops.aten.convolution: 10, torch.ops.aten.convolution_backward: 25, torch.ops.aten.mm: 7}
    assert network.flops_by_phase(counts) == {"conv_forward": 10.0, "conv_backward": 25.0}


def test_the_script_records_both_sides_on_the_same_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(network, "dense_peak_gflops", lambda dtype: 100.0)
    out = tmp_path / "results.json"
    assert network.main(["--batch-size", "4", "--rounds", "1", "--steps", "1", "--warmup", "0",
                         "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    result = data["results"]["network_embedded"]
    ref, ours = result["reference"], result["ours"]
    assert (ref["precision"], ref["channels_last"]) == ("float32", False)
    assert (ours["precision"], ours["channels_last"]) == ("bfloat16", True)
    assert ref["conv_gflop"] == pytest.approx(ours["conv_gflop"])  # same network, same work
    assert ref["conv_gflop"]["conv_backward"] > ref["conv_gflop"]["conv_forward"]
    assert (result["rounds"], result["steps"], result["warmup"]) == (1, 1, 0)
    assert data["machine"]["kind"].startswith("cpu_") and data["machine"]["cpu_model"]
    assert "dense-kernel peak" in capsys.readouterr().out


def test_the_script_rejects_an_empty_batch_by_name(capsys):
    with pytest.raises(SystemExit):
        network.main(["--batch-size", "0"])
    assert "--batch-size must be at least 1, got 0" in capsys.readouterr().err
