"""Shared fixtures: project root, the shared real data sets, and a throwaway copy of the repo."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tapework.params import Params, load_params
from tools.workspace import ROOT, SHARED_DATA, copy_project, run, stage_command, tool_env, update_params  # noqa: F401  (shared with the tests)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


# Test tiers (README "Tests"). Tier 2 is the tests marked `tier2`: long end-to-end checks of the
# tools around the pipeline (benchmark scripts, the browser, DVC's queue and lock, the gate, the
# multi-seed statistics runs). Run with no test paths, pytest runs tier 1 (the README's test
# command); naming files or tests runs them whatever their tier; --tier picks explicitly.
TIERS = ("1", "2", "all")
TIER_KEY = "tapework_tier"  # xdist hands the controller's choice to each worker under this key


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--tier", choices=TIERS, default=None,
        help="1: every test not marked tier2 (the default when no test paths are named); 2: only the "
        "tier2 tests; all: every test (what .ci/run runs, as tier 1 then tier 2)",
    )


def selected_tier(config: pytest.Config) -> str:
    if hasattr(config, "workerinput"):
        return config.workerinput[TIER_KEY]
    tier = config.getoption("--tier")
    if tier is None:
        tier = "1" if config.args_source == pytest.Config.ArgsSource.TESTPATHS else "all"
    return tier


def pytest_configure_node(node) -> None:  # pytest-xdist hook, called in the controller per worker
    node.workerinput[TIER_KEY] = selected_tier(node.config)


def pytest_report_header(config: pytest.Config) -> str:
    tier = selected_tier(config)
    other = {"1": "`--tier 2` runs the rest, `--tier all` every test", "2": "tier 1 is the default", "all": ""}[tier]
    return f"tapework test tier: {tier}" + (f" ({other})" if other else "")


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):  # xdist's workers do not print; the controller says it once
        terminalreporter.write_line(pytest_report_header(config))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    tier = selected_tier(config)
    if tier == "all":
        return
    keep, drop = [], []
    for item in items:
        in_tier_two = item.get_closest_marker("tier2") is not None
        (keep if in_tier_two == (tier == "2") else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def make_params(changes: dict[str, object] | None = None) -> Params:
    """The committed params.yaml with dotted-key `changes`, validated: tests run the settings `dvc repro` runs."""
    return load_params(ROOT / "params.yaml", changes)


# One reason for every real-data skip, so pytest's summary prints it once with the count.
SHARED_DATA_MISSING = (
    f"real-data test: {SHARED_DATA} is missing. Put the genuine data sets there (mnist/, fashion-mnist/, "
    "california-housing/: the canonical files, see README 'Tests') or set TAPEWORK_SHARED_DATA to their folder"
)


def shared_data(name: str) -> Path:
    """A folder of the shared real data. Missing: skipped with one reason, or a failure where
    TAPEWORK_REQUIRE_SHARED_DATA=1 (.ci/run sets it, so CI always proves the real-data tests)."""
    folder = SHARED_DATA / name
    if not folder.is_dir():
        if os.environ.get("TAPEWORK_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(f"{SHARED_DATA_MISSING} (TAPEWORK_REQUIRE_SHARED_DATA=1 makes this a failure)")
        pytest.skip(SHARED_DATA_MISSING)
    return folder


TINY_PARAMS = {
    "preprocess.max_train_examples": 400,
    "train.epochs": 3,
    "train.batch_size": 16,
    "train.mlp.hidden_units": [32],
    "train.histogram_every": 1,
}


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every test (and every stage it runs) gets its own download cache and no mirror from outside."""
    monkeypatch.setenv("TAPEWORK_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TAPEWORK_MIRROR", raising=False)
    # Asks train() to split the CPU into devices, which fails once TF has started in this process.
    monkeypatch.delenv("TAPEWORK_LOGICAL_CPUS", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")  # never send loopback requests to a proxy
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """A throwaway copy of the repo (see copy_project) with tiny params."""
    return copy_project(tmp_path / "repo", TINY_PARAMS)


# Beside the `tiny_results` repo: what its `dvc repro` printed ({"stdout": ..., "stderr": ...}).
TINY_REPRO_OUTPUT = "repro-output.json"


@pytest.fixture(scope="session")
def tiny_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repo copy with tiny params after one full `dvc repro` from scratch, made once per test process
    (each pytest-xdist worker): never use it directly, take a copy with `tiny_trained`. What that
    run printed is in TINY_REPRO_OUTPUT beside it."""
    repo = copy_project(tmp_path_factory.mktemp("tiny-results") / "repo", TINY_PARAMS)
    result = run(["dvc", "repro"], repo, TAPEWORK_CACHE=str(repo.parent / "cache"))
    (repo.parent / TINY_REPRO_OUTPUT).write_text(json.dumps({"stdout": result.stdout, "stderr": result.stderr}))
    return repo


@pytest.fixture
def tiny_trained(tiny_results: Path, tmp_path: Path) -> Path:
    """A throwaway copy of `tiny_results`: every stage's outputs exist, uncommitted, and `dvc status` is clean."""
    target = tmp_path / "repo"
    shutil.copytree(tiny_results, target, symlinks=True)
    return target
