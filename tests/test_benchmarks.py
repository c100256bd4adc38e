"""Smoke tests of the benchmark scripts: they run, print their figures, and compare like with like.

Nothing about speed is asserted (timings on shared machines are noise for a test).
"""

import json
import math
import re
import sys

import pytest

from tests.conftest import ROOT, run, shared_data

pytestmark = pytest.mark.tier2  # tools around the pipeline: tier 2 (tests/conftest.py)


def run_benchmark(script: str, *arguments: str, timeout: float) -> str:
    """`python benchmarks/<script> ARGUMENTS` from the project root; its stdout, after checking it exited 0.
    `timeout` only guards against a hang."""
    return run([sys.executable, str(ROOT / "benchmarks" / script), *arguments], ROOT, timeout=timeout).stdout


def test_loop_vs_fit_quick_runs_and_compares_like_with_like(tmp_path):
    report_path = tmp_path / "quick.json"
    out = run_benchmark("loop_vs_fit.py", "--quick", "--json", str(report_path), timeout=180)  # the quick run takes seconds
    assert re.search(r"^MACHINE .+, \d+ cores, TensorFlow \S+", out, re.M), out
    for model in ("mlp", "residual_mlp"):  # the default model and the seed's setup
        assert re.search(rf"^RATIO model={model} batch=64 c/a=\d+\.\d\d c/b=\d+\.\d\d$", out, re.M), out
        assert re.search(rf"^PARITY model={model} batch=64 fit_loss=\S+ loop_loss=\S+", out, re.M), out
    assert "| model | batch | variant | samples/s | vs (a) |" in out

    report = json.loads(report_path.read_text())
    assert report["determinism"] is True and "b-xla" not in {outcome["key"] for outcome in report["outcomes"]}  # (b') needs determinism off
    assert {outcome["model"] for outcome in report["outcomes"]} == {"mlp", "residual_mlp"}
    outcomes = {outcome["key"]: outcome for outcome in report["outcomes"] if outcome["model"] == "mlp"}
    assert {"a", "b", "c"} <= outcomes.keys()
    fit, loop = outcomes["a"], outcomes["c"]
    assert fit["samples"] == loop["samples"] and fit["batch_size"] == loop["batch_size"] == 64
    assert len(fit["losses"]) == len(loop["losses"]) == 3  # warm-up + 2 measured epochs each
    # Same data, initial weights, optimizer and loss: the first epoch's mean loss nearly agrees
    # (only the shuffling and dropout masks differ), and both then learn to about the same loss.
    assert loop["losses"][0] == pytest.approx(fit["losses"][0], rel=0.05)
    for fit_loss, loop_loss in zip(fit["losses"], loop["losses"]):
        assert abs(fit_loss - loop_loss) <= 0.25 * max(fit_loss, loop_loss) + 0.02, (fit["losses"], loop["losses"])
    assert max(fit["losses"][-1], loop["losses"][-1]) < 0.5 * math.log(10)  # learned: far below chance
    # fit with steps_per_execution=32 is the same computation as fit: identical losses.
    assert outcomes["b"]["losses"] == pytest.approx(fit["losses"], rel=1e-4)


def test_pipeline_figures_runs_on_the_real_fashion_mnist(tmp_path):
    report_path = tmp_path / "figures.json"
    command = [
        "pipeline_figures.py", "--data", str(shared_data("fashion-mnist")),
        "--train-epochs", "1", "--train-repeats", "1", "--preprocess-repeats", "1", "--dvc-repeats", "1", "--json", str(report_path),
    ]  # fmt: skip
    out = run_benchmark(*command, timeout=600)
    for row in ("| Fashion-MNIST preprocess peak RSS |", "| Fashion-MNIST train epoch 1,", "| no-op `dvc repro` / `dvc status` |"):
        assert row in out, out
    figures = json.loads(report_path.read_text())
    assert figures["preprocess"]["counts"] == {"train": 54000, "val": 6000, "test": 10000}
    assert figures["train"]["train_examples"] == 54000 and len(figures["train"]["runs"][0]["epoch_seconds"]) == 1
    assert figures["train"]["final_history"]["val_accuracy"] > 0.8  # one real epoch of the default mlp learns
    assert figures["dvc"]["status_after_repro"] == "Data and pipelines are up to date."


def test_loop_vs_fit_strongest_fit_baseline_runs_with_xla_when_determinism_is_off(tmp_path):
    """(b'): fit with steps_per_execution=32 and jit_compile=True; the benchmark asserts Keras kept XLA."""
    report_path = tmp_path / "off.json"
    out = run_benchmark("loop_vs_fit.py", "--quick", "--no-determinism", "--bf16", "--models", "residual_mlp", "--json", str(report_path), timeout=180)
    assert re.search(r"^RATIO model=residual_mlp batch=64 c/a=\d+\.\d\d c/b=\d+\.\d\d c/b'=\d+\.\d\d$", out, re.M), out
    report = json.loads(report_path.read_text())
    strongest = next(outcome for outcome in report["outcomes"] if outcome["key"] == "b-xla")
    assert strongest["note"] == "jit_compile=True" and len(strongest["losses"]) == 3
    assert strongest["losses"][-1] < strongest["losses"][0]  # it trains
    assert "residual_mlp:64:b'/a" in report["ratios"]
    variants = {outcome["key"]: outcome for outcome in report["outcomes"]}
    for key in ("c-bf16", "c-bf16-jit-flip", "c-jit-flip"):  # train.mixed_precision: bfloat16, XLA on and off
        assert variants[key]["losses"][-1] < variants[key]["losses"][0], key
    assert "mixed_bfloat16" in variants["c-bf16"]["label"]


def test_scale_quick_runs_the_real_stages_on_generated_idx_shards_and_prints_each_figure(tmp_path):
    report_path = tmp_path / "scale.json"
    out = run_benchmark("scale.py", "--quick", "--workdir", str(tmp_path / "work"), "--json", str(report_path), timeout=600)  # the quick run takes about half a minute
    assert re.search(r"^BASELINE stage=train dataset=digits format=arrays peak_rss_mib=\d+ ", out, re.M), out
    for examples in (3000, 6000):  # the quick size and its double
        for stage in ("download", "preprocess", "train"):
            assert re.search(rf"^STAGE examples={examples} stage={stage} seconds=\d+\.\d peak_rss_mib=\d+", out, re.M), out
        assert re.search(rf"^TARGET examples={examples} preprocess_peak_mib=\d+ .* train_above_digits_mib=-?\d+ ", out, re.M), out
    assert re.search(r"^TARGET doubling stage=preprocess growth=[-+]\d+\.\d%", out, re.M), out
    for kind in ("arrays", "shards"):
        assert re.search(rf"^THROUGHPUT dataset=digits model=mlp batch=64 format={kind} epoch_median_seconds=\d+\.\d\d", out, re.M), out
    assert re.search(r"^RATIO shards/arrays=\d+\.\d\d ", out, re.M), out

    report = json.loads(report_path.read_text())
    for run, examples in zip(report["runs"], (3000, 6000), strict=True):
        counts = run["counts"]
        # Every generated example went through download and preprocess: 90/10 train/val, plus the N/6 test file.
        assert counts["train"] + counts["val"] == examples and counts["test"] == examples // 6
        assert run["shard_bytes"] == sum(counts.values()) * (28 * 28 + 4)  # one 788-byte record per example
        assert [stage["stage"] for stage in run["stages"]] == ["download", "preprocess", "train"]
        assert len(run["stages"][2]["epoch_seconds"]) == 1  # one epoch, read from the train stage's own log
    assert report["throughput"]["train_examples"] > 0 and set(report["throughput"]["examples_per_second"]) == {"arrays", "shards"}


def test_roofline_quick_prints_the_bound_the_epoch_split_and_a_profile_for_both_models(tmp_path):
    report_path = tmp_path / "roofline.json"
    out = run_benchmark("roofline.py", "--quick", "--profile", "--json", str(report_path), timeout=300)  # the quick run takes about 15 s
    assert re.search(r"^MATMUL 1024x1024x1024 gflops=\d+\.\d$", out, re.M), out
    rows = json.loads(report_path.read_text())["rows"]
    assert [(row["model"], row["batch"]) for row in rows] == [("residual_mlp", 64), ("mlp", 64)]
    # FLOPs from the Dense kernels: the residual MLP of params.yaml on 28x28x1 has 482,986 parameters, nearly all in kernels.
    residual = rows[0]
    assert 6 * 470_000 < residual["train_flops_per_example"] < 6 * 482_986
    for row in rows:
        assert re.search(rf"^ROOFLINE model={row['model']} batch=64 .* of_roofline=\d+%$", out, re.M), out
        assert row["roofline_seconds"] > 0 and row["epoch_seconds"] > 0 and row["resident_batch_seconds"] > 0 and row["validation_seconds"] > 0
        assert math.isclose(row["roofline_seconds"], 5_500 * row["train_flops_per_example"] / (row["matmul_gflops"] * 1e9))
        # The profiled epoch found the compiled step and its matmuls in the trace (an empty parse would give zeros).
        profile = row["profile"]
        assert profile["executable"] > 0 and profile["matmul"] > 0 and profile["fusion"] > 0
        assert profile["matmul"] + profile["fusion"] < profile["epoch"] and math.isclose(profile["outside_executable"], profile["epoch"] - profile["executable"])
        assert re.search(rf"^PROFILE model={row['model']} batch=64 epoch_s=\S+ xla_step_s=\S+ matmul_s=\S+ fused_elementwise_s=\S+", out, re.M)


def test_startup_quick_times_the_tensorflow_import_and_the_exit_both_ways(tmp_path):
    report_path = tmp_path / "startup.json"
    out = run_benchmark("startup.py", "--quick", "--json", str(report_path), timeout=300)  # the quick run takes about 15 s
    imported, ended = json.loads(report_path.read_text())["rows"]
    assert imported["import"] == "tensorflow" and imported["without_hook_seconds"] > 0 and imported["with_hook_seconds"] > 0
    assert re.search(r"^IMPORT what=tensorflow without_hook_s=\d+\.\d\d with_hook_s=\d+\.\d\d ratio=\d+\.\d\d$", out, re.M), out
    assert ended["python_exit_seconds"] > 0 and ended["exit_now_seconds"] > 0
    assert re.search(r"^EXIT python_exit_s=\d+\.\d\d exit_now_s=\d+\.\d\d teardown_s=-?\d+\.\d\d$", out, re.M), out


def test_loop_modes_quick_prints_each_epoch_with_its_cpu_ticks(tmp_path):
    report_path = tmp_path / "modes.json"
    out = run_benchmark("loop_modes.py", "--quick", "--json", str(report_path), timeout=180)  # the quick run takes seconds
    assert re.search(r"^RUN model=mlp batch=64 samples=2048 steps_per_execution=\d+ jit_compile=True op_determinism=on cpus=\d+$", out, re.M), out
    epochs = json.loads(report_path.read_text())["epochs"]
    assert [epoch["epoch"] for epoch in epochs] == [1, 2, 3]
    for epoch in epochs:
        assert re.search(
            rf"^EPOCH {epoch['epoch']} samples/s=[\d,]+ before_calls_ms=\d+ calls_ms=\d+ after_calls_ms=\d+ process_cores=\d+\.\d\d idle_ticks=\d+ steal_ticks=\d+ wall_ticks=\d+ busiest_threads=\S+\[\d+\]:\d+",
            out,
            re.M,
        ), out
        assert epoch["samples_per_second"] > 0 and epoch["process_cores"] > 0 and len(epoch["busiest_threads"]) == 3
        # The three parts are the epoch: they add up to its wall time.
        parts = [epoch["before_calls_ms"], epoch["calls_ms"], epoch["after_calls_ms"]]
        assert min(parts) >= 0 and epoch["calls_ms"] > 0
        assert sum(parts) == pytest.approx(1000 * 2048 / epoch["samples_per_second"], abs=1e-6)
    # The first epoch traces and compiles on this process's threads: they did measurable work.
    assert sum(thread["ticks"] for thread in epochs[0]["busiest_threads"]) > 0


def test_tf_data_teardown_quick_times_the_iterator_deletion_with_autotuning_on_and_off(tmp_path):
    report_path = tmp_path / "teardown.json"
    out = run_benchmark("tf_data_teardown.py", "--quick", "--json", str(report_path), timeout=120)  # the quick run takes seconds
    assert re.search(r"^RUN elements=20 step_ms=1 repeats=2 batch=64x784$", out, re.M), out
    for setting in ("on", "off"):
        assert re.search(rf"^RESULT autotune={setting}\s+delete_ms median=\d+\.\d max=\d+\.\d \(epochs: [\d., ]+\)  iterate_s median=\d+\.\d{{3}}$", out, re.M), out
    results = json.loads(report_path.read_text())
    assert sorted(results) == ["off", "on"]
    for epochs in results.values():
        assert len(epochs) == 2
        # 20 batches with 1 ms of work each: an epoch cannot iterate in less than 20 ms.
        assert all(epoch["delete_ms"] >= 0 and epoch["iterate_seconds"] >= 0.02 for epoch in epochs)
