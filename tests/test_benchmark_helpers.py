"""The benchmark scripts, checked without timing anything: step timing and the step's shares in the
engine's loop, ours / reference ratios, the one results file per machine kind, the network step's
operator split and FLOPs against independent counts, and ``gpu.py``'s pieces at tiny sizes on the
CPU (it runs once per lent GPU session, so it must be right before it gets there)."""
import functools
import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from simclrv2.config import RuntimeConfig
from simclrv2.engine.runtime import Runtime
from simclrv2.engine.trainer import TrainTask, train

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


common, measure, run, network, gpu = (_load(name) for name in ("common", "measure", "run", "network", "gpu"))


def _marked_timer(marks_per_step, waits=None):
    """One 1 s step per entry; ``marks_per_step[i]`` are the ``forward`` marks after batch ``i``."""
    timer = common.StepTimer()
    for step, marks in enumerate(marks_per_step):
        timer.requested.append(float(step))
        timer.received.append(step + (waits or [0.0] * len(marks_per_step))[step])
        for seconds in marks:
            timer.mark("forward", seconds)
        timer.step_ends.append(step + 1.0)
    return timer


def test_step_timer_summary_counts_only_the_steps_after_warmup():
    out = _marked_timer([[0.9, 0.9], [0.1, 0.2], [], [0.3]], waits=[0.5, 0.1, 0.0, 0.2]).summary(1, 256)
    assert out["timed_steps"] == 3 and out["s_per_step"] == pytest.approx(1.0)
    assert out["images_per_s"] == pytest.approx(256.0)
    assert out["data_wait_fraction"] == pytest.approx(0.3 / 3)
    assert out["forward_fraction"] == pytest.approx(0.6 / 3)  # two marks in one step add, none counts 0


def test_step_timer_rejects_missing_warmup_and_too_few_steps():
    timer = _marked_timer([[], []])
    with pytest.raises(ValueError, match="warmup"):
        timer.summary(warmup=0, images_per_step=8)
    with pytest.raises(RuntimeError, match="more than 2 steps"):
        timer.summary(warmup=2, images_per_step=8)


def test_step_timer_run_steps_each_batch_and_stops_after_the_count():
    seen, timer = [], common.StepTimer()
    timer.run(iter(range(10)), steps=4, step=seen.append)
    assert seen == [0, 1, 2, 3] and len(timer.step_ends) == len(timer.received) == 4
    assert all(r >= q for q, r in zip(timer.requested, timer.received))
    loader_only = common.StepTimer()
    loader_only.run(["a", "b"], steps=5)  # a short loader ends the run early
    assert len(loader_only.step_ends) == 2


class _Batches:
    def __init__(self, n: int):
        self.n = n

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        pass

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(torch.ones(self.n, 4, 3))


def test_the_timed_engine_loop_splits_every_step_into_its_phases(tmp_path):
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    task = TrainTask(stage="pretrain", model=model, optimizer=optimizer, batches=_Batches(3),
                     step_fn=lambda x, step: (model(x * 2).pow(2).mean(), {}), lr_fn=lambda step: 0.1,
                     total_steps=3, images_per_step=4, checkpoint_meta={})
    timer = common.StepTimer()
    cfg = RuntimeConfig(progress=False, resume=False)
    measure.timed_train(train, timer, torch.device("cpu"), phases=True)(
        task, Runtime(torch.device("cpu"), None, False, 0, 1), cfg, tmp_path)
    assert len(timer.received) == 3
    for phase in ("augment", "forward", "optimizer"):
        assert [step for step, _ in timer.phases[phase]] == [0, 1, 2], phase
        assert all(seconds >= 0 for _, seconds in timer.phases[phase])


def test_step_breakdown_fills_missing_phases_and_sums_to_one():
    shares = run.step_breakdown({"data_wait_fraction": 0.01, "augment_fraction": 0.03, "forward_fraction": 0.3})
    assert shares["optimizer"] == 0.0 and shares["backward_and_rest"] == pytest.approx(0.66)


def _result(images_per_s, workers=1, threads=2, **extra):
    return {"images_per_s": images_per_s, "peak_mem_mib": 100.0, "spec": {"workers": workers, "threads": threads},
            **extra}


def test_summarise_takes_each_sides_best_and_pairs_rounds():
    ours = [_result(500.0), {"error": "timed out"}, _result(660.0, forward_fraction=0.3)]
    reference = [[_result(200.0, workers=0, peak_mem_mib=200.0), _result(240.0)], [_result(230.0)], [_result(220.0)]]
    out = run.summarise("e2e_embedded", ours, reference)
    assert out["ratio"] == pytest.approx(660.0 / 240.0) and out["target"] == 3.0
    assert out["paired_ratios"] == pytest.approx([500.0 / 240.0, 660.0 / 220.0])  # the failed round drops out
    assert out["reference_sweep"] == {"workers=0,threads=2": [200.0], "workers=1,threads=2": [240.0, 230.0, 220.0]}
    assert (out["reference"]["workers"], out["memory_ratio"]) == (1, pytest.approx(1.0))
    assert out["ours_step_breakdown"]["forward"] == pytest.approx(0.3)
    failed = run.summarise("augment_32", [{"error": "boom"}], [[_result(100.0)]])
    assert failed["ratio"] is None and failed["error"] == ["boom"]


@pytest.mark.parametrize("cpus, reference_workers", [(2, [1, 2, 3]), (16, [8, 16]), (64, [32, 64])])
def test_folder_specs_time_whole_worker_waves_inside_one_pass(monkeypatch, cpus, reference_workers):
    # 16 CPUs is the GPU machine, where the first plan ran past the folder's images.
    monkeypatch.setattr(run.os, "sched_getaffinity", lambda pid: set(range(cpus)))
    plan = {"folder": dict(run.PLANS["full"]["folder"], workers=reference_workers)}
    ours, references = run.specs("folder_224", plan, "cpu")
    assert ours["kind"] == "folder_ours" and "workers" not in ours  # our default
    assert len({spec["batch_size"] for spec in [ours, *references]}) == 1  # the same batch on both sides
    for spec, wave in [(ours, min(cpus, 32))] + [(r, r["workers"]) for r in references]:
        assert spec["warmup"] >= wave and spec["batches"] % wave == 0 and spec["batches"] >= plan["folder"]["batches"]
        assert (spec["warmup"] + spec["batches"] + 1) * spec["batch_size"] <= spec["num_images"] and spec["batch_size"] >= 1


def test_results_merge_into_one_file_per_machine_kind(tmp_path):
    path = tmp_path / "results.json"
    info = {"kind": "cpu_amd_epyc_2core", "cpu_model": "AMD EPYC", "torch": "2"}
    common.record(path, info, {"augment_32": {"ratio": 7.0}, "augment_96": {"ratio": 6.0}})
    common.record(path, info, {"augment_32": {"ratio": 9.0}})
    results = json.loads(path.read_text())["results"]
    assert (results["augment_32"]["ratio"], results["augment_96"]["ratio"]) == (9.0, 6.0)
    assert {"commit", "date", "torch"} <= set(results["augment_32"])
    with pytest.raises(SystemExit, match="results/gpu_h100.json"):
        common.record(path, {**info, "kind": "gpu_h100"}, {"augment_32": {}})


@pytest.mark.parametrize("model, gpu, kind", [("AMD EPYC", None, "cpu_amd_epyc_2core"),
                                              ("Intel(R) Xeon(R) Platinum 8480+ CPU @ 2.0GHz", None,
                                               "cpu_intel_xeon_platinum_8480_2core"),
                                              ("AMD EPYC", "NVIDIA H100 80GB HBM3", "gpu_h100")])
def test_machine_kind_names_the_cpu_model_or_the_gpu(monkeypatch, model, gpu, kind):
    monkeypatch.setattr(common, "cpu_model", lambda: model)
    monkeypatch.setattr(common.os, "sched_getaffinity", lambda pid: {0, 1})
    info = common.machine(gpu)
    assert info["kind"] == kind and info["cpu_model"] == model


# --------------------------------------------------------------------------- network.py
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


def test_free_makes_batch_norm_and_relu_the_identity_only_inside_the_block():
    import torch.nn.functional as F
    from torch import nn
    bn, x = nn.BatchNorm2d(3).train(), torch.randn(4, 3, 5, 5) * 3 + 1
    with network.free(["batch_norm"]):
        assert torch.equal(bn(x), x)
        assert torch.equal(F.relu(x), x.clamp_min(0))  # ReLU untouched
    with network.free(["batch_norm", "relu"]):
        assert torch.equal(F.relu(x), x) and torch.equal(F.relu_(x.clone()), x)
    assert bn(x).mean(dim=(0, 2, 3)).abs().max() < 1e-5  # normal again
    assert torch.equal(F.relu(x), x.clamp_min(0))


def test_the_ceiling_records_our_step_with_the_work_made_free(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(network, "dense_peak_gflops", lambda dtype: 100.0)
    out = tmp_path / "results.json"
    assert network.main(["--batch-size", "4", "--rounds", "1", "--steps", "1", "--warmup", "0",
                         "--ceiling", "--json", str(out)]) == 0
    result = json.loads(out.read_text())["results"]["network_embedded"]
    assert set(result["ceiling"]) == set(network.CEILINGS)
    for bound in result["ceiling"].values():
        assert bound["speedup_bound"] == pytest.approx(result["ours"]["step_ms_best"] / bound["step_ms_best"])
    assert "batch_norm and relu free" in capsys.readouterr().out


def test_the_script_rejects_an_empty_batch_by_name(capsys):
    with pytest.raises(SystemExit):
        network.main(["--batch-size", "0"])
    assert "--batch-size must be at least 1, got 0" in capsys.readouterr().err


# --------------------------------------------------------------------------- gpu.py
TINY = dict(gpu.TINY, size=16, source=20, batch=4, warmup=1, steps=1)


@pytest.fixture
def one_thread(monkeypatch):
    """One thread, as the stage tests run: tiny ops on a busy machine's OpenMP threads crawl."""
    monkeypatch.setattr(gpu, "RuntimeConfig", functools.partial(gpu.RuntimeConfig, num_threads=1))


def test_largest_fitting_halves_the_batch_until_it_fits_and_gives_up_below_the_minimum(monkeypatch):
    monkeypatch.setattr(gpu.torch.cuda, "empty_cache", lambda: None)
    tried = []

    def fits_at_32(batch: int) -> dict:
        tried.append(batch)
        if batch > 32:
            raise torch.OutOfMemoryError(f"batch {batch}")
        return {"batch": batch}

    assert gpu.largest_fitting(fits_at_32, 128, 8) == {"batch": 32, "oom_at": [128, 64]}
    assert tried == [128, 64, 32]
    with pytest.raises(torch.OutOfMemoryError):
        gpu.largest_fitting(fits_at_32, 128, 100)


def test_throughput_times_the_engine_loop_and_the_views_alone(one_thread):
    out = gpu.throughput(TINY, 4, "cpu", precision="fp32")
    assert out["views_per_s"] == pytest.approx(2 * out["images_per_s"]) and out["images_per_s"] > 0
    assert 0 < out["augment_s_per_step"] < 60 and 0 < out["augment_host_enqueue_s"] <= out["augment_s_per_step"]
    assert out["augment_fraction"] == pytest.approx(out["augment_s_per_step"] / out["s_per_step"])


def test_kernel_profile_reports_shares_of_the_profiled_steps(one_thread):
    shares = gpu.throughput(TINY, 4, "cpu", precision="fp32", profile=True)["top"]
    values = [share for _, share in shares]
    assert 0 < len(values) <= 12 and values == sorted(values, reverse=True) and sum(values) <= 1.0001
    assert any("convolution" in name for name, _ in shares)
