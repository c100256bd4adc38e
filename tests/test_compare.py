"""`python -m tapework.compare`: the comparison on fixed per-seed values, reading revisions through
DVC in a small git repo, and end to end on the default digits pipeline with 3 seeds at two
learning rates, checked against Welch's and the paired test computed separately with scipy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import scipy.stats
import yaml

from tapework.compare import CompareError, Side, as_json, choose_test, compare, is_worse, main, pairs, render_markdown, render_text
from tapework.io import write_json
from tapework.stats import seeds_needed
from tests.conftest import TINY_PARAMS, copy_project, run, update_params

SEEDS = (7, 8, 42)


def side(name: str, accuracy: list[float], loss: list[float] | None = None, seeds: tuple = SEEDS) -> Side:
    values = {"test.accuracy": accuracy, "test.loss": loss or [1 - value for value in accuracy], "epochs_run": [20.0] * len(accuracy)}
    return Side(name, seeds, values, "metrics/repeats_by_seed.json")


BASE = side("HEAD", [0.9694, 0.9721, 0.9666])
# Every seed a little better: the paired test sees it, the seed spread hides it from Welch.
SHIFTED = side("workspace", [0.9721, 0.9749, 0.9694])


def test_same_seeds_are_paired_and_the_verdict_follows_the_direction():
    comparison = compare(BASE, SHIFTED, "test.accuracy")
    assert comparison.test_kind == "paired" and comparison.verdict == "better"
    reverse = compare(SHIFTED, BASE, "test.accuracy")
    assert reverse.verdict == "worse" and is_worse(reverse, "test.accuracy")
    # test.loss falls where accuracy rises: lower is better, so it is "better" too, never "worse".
    assert compare(BASE, SHIFTED, "test.loss").verdict == "better" and not is_worse(comparison, "test.loss")


def test_welch_when_the_seeds_differ_or_on_request():
    other_seeds = side("workspace", SHIFTED.values["test.accuracy"], seeds=(1, 2, 3))
    welch = compare(BASE, other_seeds, "test.accuracy")
    assert welch.test_kind == "welch"
    assert welch.verdict == "no evidence of a difference at this many seeds"
    reference = scipy.stats.ttest_ind(other_seeds.values["test.accuracy"], BASE.values["test.accuracy"], equal_var=False)
    row = welch.metric("test.accuracy")
    assert row.test.p_value == pytest.approx(reference.pvalue, rel=1e-9)
    assert compare(BASE, SHIFTED, "test.accuracy", "welch").test_kind == "welch"
    with pytest.raises(CompareError, match="same seeds"):
        compare(BASE, other_seeds, "test.accuracy", "paired")


def test_seeds_needed_uses_the_formula_on_the_observed_difference_and_spread():
    welch = compare(BASE, side("workspace", [0.9700, 0.9760, 0.9690], seeds=(1, 2, 3)), "test.accuracy")
    a, b = BASE.values["test.accuracy"], welch.b.values["test.accuracy"]
    spread = ((scipy.stats.tstd(a) ** 2 + scipy.stats.tstd(b) ** 2) / 2) ** 0.5
    difference = sum(b) / 3 - sum(a) / 3
    assert welch.seeds_needed == seeds_needed(difference, spread, paired_design=False) and welch.seeds_needed > 3
    assert f"{welch.seeds_needed} per side" in render_text(welch)


def test_a_single_seed_gets_no_interval_and_says_so():
    single = side("HEAD", [0.9694], seeds=(42,))
    comparison = compare(single, SHIFTED, "test.accuracy")
    assert comparison.test_kind == "none" and comparison.verdict == "no verdict"
    assert "No interval and no test: HEAD ran a single seed (n = 1)" in comparison.explanation and "repeats.extra_seeds" in comparison.explanation
    text = render_text(comparison)
    assert "no interval (n = 1)" in text
    # The spread of the side with repeats still sizes the difference.
    assert comparison.seeds_needed is not None and "the side with repeats" in comparison.seeds_needed_note
    both_single = compare(single, side("workspace", [0.9721], seeds=(42,)), "test.accuracy")
    assert both_single.seeds_needed is None and "neither side has repeats" in both_single.seeds_needed_note
    assert not is_worse(compare(SHIFTED, single, "test.accuracy"), "test.accuracy")  # no test, never "worse"


def test_only_the_primary_metric_gets_a_verdict():
    comparison = compare(BASE, SHIFTED, "test.loss")
    assert comparison.metrics[0].metric == "test.loss"  # the primary first
    text = render_text(comparison)
    assert "verdict on test.loss" in text and "test.loss (primary)" in text and "descriptive" in text
    with pytest.raises(CompareError, match="no better direction"):
        compare(BASE, SHIFTED, "epochs_run")
    with pytest.raises(CompareError, match="not reported by both"):
        compare(BASE, SHIFTED, "test.rmse")


def test_markdown_and_json_outputs():
    comparison = compare(BASE, SHIFTED, "test.accuracy")
    markdown = render_markdown(comparison)
    assert markdown.startswith("### workspace against HEAD: **better** on `test.accuracy`")
    assert "| **test.accuracy** (primary) |" in markdown and "|---|" in markdown
    data = json.loads(json.dumps(as_json(comparison)))  # plain JSON: no NaN, no numpy
    assert data["verdict"] == "better" and data["test"] == "paired" and data["a"]["seeds"] == list(SEEDS)
    reference = scipy.stats.ttest_rel(SHIFTED.values["test.accuracy"], BASE.values["test.accuracy"])
    assert data["metrics"]["test.accuracy"]["p_value"] == pytest.approx(reference.pvalue, rel=1e-9)
    assert data["metrics"]["epochs_run"]["p_value"] is None  # 0 / 0: no spread at all, undefined
    assert data["metrics"]["test.accuracy"]["primary"] and not data["metrics"]["test.loss"]["primary"]


def test_argument_pairs():
    assert pairs([]) == [("HEAD", "workspace")]
    assert pairs(["main"]) == [("main", "workspace")]
    assert pairs(["a", "b", "c"]) == [("a", "b"), ("a", "c")]
    assert choose_test(BASE, side("x", [0.9], seeds=(1,)), "auto") == "none"


# --------------------------------------------------------------------------- reading through DVC


def git_commit(repo: Path, message: str) -> None:
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", message], repo)


def per_seed(accuracies: dict[int, float]) -> dict:
    return {"seeds": [{"seed": seed, "metrics": {"test": {"accuracy": value, "loss": 1 - value}, "epochs_run": 3}} for seed, value in sorted(accuracies.items())]}


@pytest.fixture
def history_repo(tmp_path) -> Path:
    """A project copy whose git history holds results written by hand (no training):
    HEAD~2 from before repeats (no aggregate stage: one run), HEAD~1 and HEAD with 3 seeds."""
    repo = copy_project(tmp_path / "repo")
    dvc_yaml = yaml.safe_load((repo / "dvc.yaml").read_text())
    stages = dvc_yaml["stages"]
    option = lambda stage, name: stages[stage]["cmd"].split(f"{name} ")[1].split()[0]  # noqa: E731
    full = (repo / "dvc.yaml").read_text()
    old = dict(dvc_yaml, stages={name: stage for name, stage in stages.items() if name not in ("aggregate", "train_seed", "evaluate_seed")})
    (repo / "dvc.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    write_json(repo / option("train", "--metrics"), {"epochs_run": 3, "stopped_early": False})
    write_json(repo / option("evaluate", "--metrics"), {"test": {"accuracy": 0.95, "loss": 0.05}})
    write_json(repo / option("train", "--provenance"), {"seed": 42})
    git_commit(repo, "before repeats")
    (repo / "dvc.yaml").write_text(full)
    write_json(repo / option("aggregate", "--per-seed"), per_seed({7: 0.9694, 8: 0.9721, 42: 0.9666}))
    git_commit(repo, "3 seeds")
    write_json(repo / option("aggregate", "--per-seed"), per_seed({7: 0.9721, 8: 0.9749, 42: 0.9694}))
    git_commit(repo, "3 seeds, better")
    write_json(repo / option("aggregate", "--per-seed"), per_seed({7: 0.9694, 8: 0.9721, 42: 0.9666}))  # the workspace: back to HEAD~1
    return repo


def compare_json(repo: Path, *args: str) -> tuple[int, list[dict], str]:
    result = subprocess.run([sys.executable, "-m", "tapework.compare", "--repo", str(repo), "--json", *args], capture_output=True, text=True)
    return result.returncode, json.loads(result.stdout) if result.stdout else [], result.stderr


def test_reads_revisions_and_the_workspace_through_dvc(history_repo):
    code, data, _ = compare_json(history_repo)  # HEAD against the workspace
    assert code == 0 and len(data) == 1
    assert (data[0]["a"]["name"], data[0]["b"]["name"]) == ("HEAD", "workspace")
    assert data[0]["verdict"] == "worse" and data[0]["test"] == "paired"
    assert data[0]["metrics"]["test.accuracy"]["difference"] == pytest.approx(-0.0027666666666, abs=1e-10)

    code, data, _ = compare_json(history_repo, "HEAD~1", "HEAD", "workspace")
    assert code == 0 and [(c["a"]["name"], c["b"]["name"], c["verdict"]) for c in data] == [
        ("HEAD~1", "HEAD", "better"),
        ("HEAD~1", "workspace", "no evidence of a difference at this many seeds"),
    ]
    # Before repeats: the single run of the train and evaluate stages, its seed from the provenance JSON.
    code, data, _ = compare_json(history_repo, "HEAD~2", "HEAD")
    assert code == 0 and data[0]["a"]["seeds"] == [42] and data[0]["verdict"] == "no verdict"
    assert data[0]["metrics"]["test.accuracy"]["a"] == {"n": 1, "mean": 0.95}


def test_exit_codes(history_repo):
    assert compare_json(history_repo, "--fail-if-worse", "test.accuracy")[0] == 1  # the workspace is worse than HEAD
    assert compare_json(history_repo, "HEAD~1", "HEAD", "--fail-if-worse", "test.accuracy")[0] == 0
    code, _, stderr = compare_json(history_repo, "no-such-revision")
    assert code == 2 and "cannot read 'no-such-revision' through DVC" in stderr
    code, _, stderr = compare_json(history_repo, "--primary", "test.rmse")
    assert code == 2 and "test.rmse is not reported by both" in stderr
    update_params(history_repo / "params.yaml", {"train.epochs": 0})
    code, _, stderr = compare_json(history_repo)
    assert code == 2 and "no primary metric" in stderr and "train.epochs" in stderr


# --------------------------------------------------------------------------- end to end


def seed_values(repo: Path, metric: str, seeds: tuple[int, ...]) -> dict[int, float]:
    """`metric` (split.name) of every seed's run, read from the stages' own files: the train.seed run at
    the evaluate stage's path, the extra seeds from their per-seed evaluate JSONs."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    split, name = metric.split(".")
    single = stages["evaluate"]["cmd"].split("--metrics ")[1].split()[0]
    pattern = stages["evaluate_seed"]["cmd"].split("--metrics ")[1].split()[0]
    values = {42: json.loads((repo / single).read_text())[split][name]}
    for seed in seeds:
        values[seed] = json.loads((repo / pattern.replace("${item.seed}", str(seed))).read_text())[split][name]
    return values


@pytest.mark.slow
@pytest.mark.tier2
@pytest.mark.timeout(900)
def test_three_seeds_at_two_learning_rates_end_to_end(tmp_path):
    """The tiny digits pipeline with repeats.extra_seeds [7, 8] at learning rates 1e-3 (committed) and
    3e-3 (a DVC experiment); the compare command's verdict is checked against scipy on the per-seed files."""
    repo = copy_project(tmp_path / "repo", TINY_PARAMS | {"repeats.extra_seeds": [7, 8]})
    run(["dvc", "repro"], repo, timeout=900)
    git_commit(repo, "lr 1e-3, 3 seeds")
    before = seed_values(repo, "test.accuracy", (7, 8))
    assert len(set(before.values())) > 1, "three seeds gave the same accuracy: no spread to test"

    result = run(["dvc", "exp", "run", "-n", "lr3", "-S", "train.learning_rate=0.003"], repo, timeout=900)
    assert "Ran experiment(s): lr3" in result.stdout
    after = seed_values(repo, "test.accuracy", (7, 8))  # the experiment is applied to the workspace

    a, b = [before[seed] for seed in sorted(before)], [after[seed] for seed in sorted(after)]
    expected = {
        "welch": scipy.stats.ttest_ind(b, a, equal_var=False),
        "paired": scipy.stats.ttest_rel(b, a),
    }
    for test, reference in expected.items():
        code, data, stderr = compare_json(repo, "HEAD", "lr3", "--test", test)
        assert code == 0, stderr
        row = data[0]["metrics"]["test.accuracy"]
        assert data[0]["test"] == test and data[0]["a"]["seeds"] == data[0]["b"]["seeds"] == [7, 8, 42]
        assert row["difference"] == pytest.approx(sum(b) / 3 - sum(a) / 3, abs=1e-12)
        assert row["p_value"] == pytest.approx(reference.pvalue, rel=1e-9)
        interval = reference.confidence_interval(0.95)
        assert (row["ci95_low"], row["ci95_high"]) == (pytest.approx(interval.low, rel=1e-9), pytest.approx(interval.high, rel=1e-9))
        verdict = ("better" if sum(b) > sum(a) else "worse") if reference.pvalue < 0.05 else "no evidence of a difference at this many seeds"
        assert data[0]["verdict"] == verdict
    # The default (HEAD against the workspace, which holds the applied experiment) pairs the seeds.
    code, data, _ = compare_json(repo)
    assert code == 0 and data[0]["test"] == "paired" and data[0]["metrics"]["test.accuracy"]["p_value"] == pytest.approx(expected["paired"].pvalue, rel=1e-9)
    markdown = run([sys.executable, "-m", "tapework.compare", "HEAD", "lr3", "--md"], repo).stdout
    assert markdown.startswith("### lr3 against HEAD: **") and "**test.accuracy** (primary)" in markdown

    # The aggregate that dvc metrics/exp show read agrees with the per-seed files.
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], repo).stdout)
    aggregate = next(iter(shown.values()))["data"]
    repeats = next(value["data"] for path, value in aggregate.items() if path.endswith("repeats.json"))
    assert repeats["test"]["accuracy"]["n"] == 3
    assert repeats["test"]["accuracy"]["mean"] == pytest.approx(sum(b) / 3, abs=1e-12)
