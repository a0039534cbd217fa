"""The benchmark harness's arithmetic: step timing, step shares and ours / reference ratios.

The measurements themselves are not run here (they are timings, see ``benchmarks/README.md``);
these tests pin down how timestamps become the figures that the README and closing notes quote.
"""
import importlib.util
import sys
from pathlib import Path

import pytest

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


common = _load("common")
run = _load("run")


def _timer(requested, received, step_ends, phases=None):
    """A timer with the given timestamps; ``phases`` maps a name to one mark per step."""
    timer = common.StepTimer()
    timer.requested, timer.received, timer.step_ends = list(requested), list(received), list(step_ends)
    timer.phases = {k: list(enumerate(v)) for k, v in (phases or {}).items()}
    return timer


def test_step_timer_summary_counts_only_steps_after_warmup():
    # Step 0 is warm-up (slow, long wait); steps 1-3 end at 2, 3, 5 s: 3 steps in 3 s from the
    # end of step 0.
    timer = _timer(requested=[0.0, 2.0, 3.0, 4.0], received=[0.9, 2.2, 3.1, 4.3], step_ends=[2.0, 3.0, 4.0, 5.0],
                   phases={"forward": [1.0, 0.25, 0.25, 0.4], "augment": [0.5, 0.1, 0.1, 0.1]})
    out = timer.summary(warmup=1, images_per_step=256)
    assert out["timed_steps"] == 3
    assert out["images_per_s"] == pytest.approx(3 * 256 / 3.0)
    assert out["s_per_step"] == pytest.approx(1.0)
    assert out["s_per_step_min"] == pytest.approx(1.0)
    assert out["data_wait_fraction"] == pytest.approx((0.2 + 0.1 + 0.3) / 3.0)
    assert out["forward_fraction"] == pytest.approx(0.9 / 3.0)
    assert out["augment_fraction"] == pytest.approx(0.3 / 3.0)


def _marked_timer(marks_per_step):
    """One 1 s step per entry; ``marks_per_step[i]`` are the ``forward`` marks made after batch
    ``i`` arrived."""
    timer = common.StepTimer()
    for step, marks in enumerate(marks_per_step):
        timer.requested.append(float(step))
        timer.received.append(float(step))
        for seconds in marks:
            timer.mark("forward", seconds)
        timer.step_ends.append(step + 1.0)
    return timer


def test_step_timer_mark_records_the_step_of_the_latest_batch():
    timer = _marked_timer([[0.5], [], [0.1, 0.2]])
    assert timer.phases["forward"] == [(0, 0.5), (2, 0.1), (2, 0.2)]


def test_step_timer_sums_two_marks_in_one_step():
    out = _marked_timer([[0.5], [0.1, 0.2], [0.3], [0.3]]).summary(warmup=1, images_per_step=8)
    assert out["forward_fraction"] == pytest.approx((0.1 + 0.2 + 0.3 + 0.3) / 3.0)


def test_step_timer_counts_a_step_without_mark_as_zero():
    out = _marked_timer([[0.5], [0.3], [], [0.3]]).summary(warmup=1, images_per_step=8)
    assert out["forward_fraction"] == pytest.approx(0.6 / 3.0)


def test_step_timer_excludes_marks_during_warmup():
    out = _marked_timer([[0.9, 0.9], [0.9], [0.1], [0.2]]).summary(warmup=2, images_per_step=8)
    assert out["forward_fraction"] == pytest.approx(0.3 / 2.0)


def test_step_timer_rejects_missing_warmup_and_too_few_steps():
    timer = _timer([0.0, 1.0], [0.1, 1.1], [1.0, 2.0])
    with pytest.raises(ValueError, match="warmup"):
        timer.summary(warmup=0, images_per_step=8)
    with pytest.raises(RuntimeError, match="more than 2 steps"):
        timer.summary(warmup=2, images_per_step=8)


def test_step_timer_wrap_times_each_next_call():
    timer = common.StepTimer()
    items = list(timer.wrap(iter("abc")))
    assert items == ["a", "b", "c"]
    assert len(timer.requested) == len(timer.received) == 3
    assert all(r >= q for q, r in zip(timer.requested, timer.received))


def test_step_breakdown_fills_missing_phases_and_sums_to_one():
    shares = run.step_breakdown({"data_wait_fraction": 0.01, "augment_fraction": 0.03, "forward_fraction": 0.3})
    assert shares["optimizer"] == 0.0
    assert shares["backward_and_rest"] == pytest.approx(0.66)
    assert sum(shares.values()) == pytest.approx(1.0)


def _result(images_per_s, **extra):
    return {"images_per_s": images_per_s, "peak_mem_mib": 100.0, "data_wait_fraction": 0.02, **extra}


def test_summarise_takes_each_sides_best_and_pairs_rounds():
    ours = [_result(500.0), {"error": "timed out"}, _result(660.0, forward_fraction=0.3)]
    reference = [
        [_result(200.0, workers=0, threads=2, peak_mem_mib=200.0), _result(240.0, workers=1, threads=2)],
        [_result(230.0, workers=1, threads=2)],
        [_result(220.0, workers=1, threads=2)],
    ]
    out = run._summarise("e2e_embedded", ours, reference)
    assert out["ratio"] == pytest.approx(660.0 / 240.0)
    assert out["target_met"] is False  # 2.75x against the 3x target
    assert out["paired_ratios"] == pytest.approx([500.0 / 240.0, 660.0 / 220.0])  # the failed round drops out
    assert out["reference_sweep"] == {"workers=0,threads=2": [200.0], "workers=1,threads=2": [240.0, 230.0, 220.0]}
    assert out["memory_ratio"] == pytest.approx(1.0)
    assert out["ours_step_breakdown"]["forward"] == pytest.approx(0.3)


def test_summarise_reports_failure_when_a_side_has_no_result():
    out = run._summarise("augment_32", [{"error": "boom"}], [[_result(100.0, workers=2, threads=1)]])
    assert out["ratio"] is None and out["target_met"] is False
    assert out["error"] == ["boom"]


def test_ours_env_without_equals_sign_is_rejected_by_name(capsys):
    with pytest.raises(SystemExit):
        run.main(["--json", "unused.json", "--ours-env", "A=1", "OMP_WAIT_POLICY"])
    assert "'OMP_WAIT_POLICY'" in capsys.readouterr().err


@pytest.mark.parametrize("cpus, reference_workers", [(2, None), (16, [8, 16]), (64, [32, 64])])
def test_folder_specs_time_whole_worker_waves_and_carry_no_target(monkeypatch, cpus, reference_workers):
    # 16 CPUs is the GPU machine, where the first plan ran past the folder's images.
    monkeypatch.setattr(run.os, "sched_getaffinity", lambda pid: set(range(cpus)))
    plan = {"folder": dict(run.PLANS["full"]["folder"], workers=reference_workers or [1, 2, 3])}
    ours, references = run._specs("folder_224", plan, "cpu")
    assert ours["kind"] == "folder_ours" and ours["size"] == 224 and "workers" not in ours  # our default
    assert [r["workers"] for r in references] == plan["folder"]["workers"]
    assert len({spec["batch_size"] for spec in [ours, *references]}) == 1  # the same batch on both sides
    for spec, wave in [(ours, min(cpus, 32))] + [(r, max(r["workers"], 1)) for r in references]:
        assert spec["warmup"] >= wave and spec["batches"] % wave == 0 and spec["batches"] >= plan["folder"]["batches"]
        assert (spec["warmup"] + spec["batches"] + 1) * spec["batch_size"] <= spec["num_images"]  # no epoch end
        assert spec["batch_size"] >= 1
    out = run._summarise("folder_224", [_result(240.0)], [[_result(80.0, workers=3, threads=2)]])
    assert out["ratio"] == pytest.approx(3.0) and out["target_met"] is None and out["target_ratio"] is None


def test_step_timer_run_steps_each_batch_and_stops_after_the_count():
    seen = []
    timer = common.StepTimer()
    timer.run(iter(range(10)), steps=4, step=seen.append)
    assert seen == [0, 1, 2, 3] and len(timer.step_ends) == len(timer.received) == 4
    loader_only = common.StepTimer()
    loader_only.run(["a", "b"], steps=5)  # a short loader ends the run early
    assert len(loader_only.step_ends) == 2
