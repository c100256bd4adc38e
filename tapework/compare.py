"""`python -m tapework.compare [REV_OR_EXP ...]`: is a difference between two runs real, or seed noise?

Reads each side's per-seed results through DVC, at any git revision or DVC experiment (never by
rerunning): the aggregate stage's per-seed JSON, found through that revision's dvc.yaml; a
revision from before repeats existed gives its one run (metrics of the train and evaluate
stages, n = 1). Then, for every metric, both means and the difference `second - first` with its
95 % interval: the paired t-test when both sides ran the same seeds, Welch's test otherwise.

A verdict (better, worse, or no evidence of a difference) is given for one metric only, the
primary one (`repeats.primary_metric` for the data set's task, or `--primary`): with a dozen
correlated metrics, one of them is "significant" by chance far more often than 1 in 20. The others
are shown as descriptive. With the verdict comes how many seeds per side would resolve a
difference of the observed size (80 % power at the 5 % level, `stats.seeds_needed`).

Arguments: none = HEAD against the workspace; one = that revision against the workspace; two or
more = the first against each of the others. `workspace` names the workspace.
Output: a text table, `--md` (for a pull-request comment) or `--json` (a list: one object per comparison). Exit codes: 0, or 1 when
`--fail-if-worse METRIC` finds METRIC worse on any comparison, 2 on a problem the user must fix.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tapework import catalogue, stats
from tapework.cli import PARAMS_FILE
from tapework.errors import TapeworkError
from tapework.params import ParamsError, load_params
from tapework.repeats import measurements

WORKSPACE = "workspace"
EXIT_WORSE, EXIT_USER_ERROR = 1, 2
# The stage that writes the per-seed JSON, and its option naming that file in dvc.yaml.
AGGREGATE_STAGE, PER_SEED_OPTION = "aggregate", "--per-seed"
# Where a revision without repeats keeps its one run: (stage, option) pairs in its dvc.yaml.
SINGLE_RUN_METRICS = (("train", "--metrics"), ("evaluate", "--metrics"))
SINGLE_RUN_PROVENANCE = ("train", "--provenance")
VERDICTS = ("better", "worse", "no evidence of a difference at this many seeds", "no verdict")


class CompareError(TapeworkError):
    """A revision, experiment or metric that cannot be compared; the message says why and what to do."""


@dataclass(frozen=True)
class Side:
    """One revision's runs: `values[metric][i]` belongs to `seeds[i]`."""

    name: str  # as the user named it (or `workspace`)
    seeds: tuple[int | None, ...]  # None: a revision whose one run did not record its seed
    values: dict[str, list[float]]
    source: str  # which file(s) the values came from, for the report

    @property
    def n(self) -> int:
        return len(self.seeds)


@dataclass
class MetricComparison:
    metric: str
    a: stats.Summary
    b: stats.Summary
    difference: float
    higher_is_better: bool | None  # None: a count with no better direction (epochs_run, best_epoch)
    test: stats.Difference | None  # None when a side has a single seed


@dataclass
class Comparison:
    a: Side
    b: Side
    test_kind: str  # "paired", "welch" or "none"
    primary: str
    metrics: list[MetricComparison]
    verdict: str = ""
    explanation: str = ""
    seeds_needed: int | None = None
    seeds_needed_note: str = ""
    notes: list[str] = field(default_factory=list)

    def metric(self, name: str) -> MetricComparison:
        for row in self.metrics:
            if row.metric == name:
                return row
        raise CompareError(f"metric {name} is not reported by both {self.a.name} and {self.b.name}; pick one of {', '.join(row.metric for row in self.metrics)}")


# --------------------------------------------------------------------------- reading through DVC


def _option(command: str, option: str) -> str | None:
    words = shlex.split(command)
    for index, word in enumerate(words[:-1]):
        if word == option:
            return words[index + 1]
    return None


def _stage_output(stages: dict[str, Any], stage: str, option: str) -> str | None:
    entry = stages.get(stage)
    return _option(entry["cmd"], option) if isinstance(entry, dict) and isinstance(entry.get("cmd"), str) else None


def read_side(repo: Path, name: str) -> Side:
    """The runs of revision or experiment `name` (`workspace`: the working tree), read through DVC."""
    from dvc.exceptions import DvcException
    from dvc.fs import DVCFileSystem
    from dvc.scm import RevError

    rev = None if name == WORKSPACE else name
    try:
        fs = DVCFileSystem(repo=str(repo), rev=rev)
        stages = (yaml.safe_load(fs.read_text("dvc.yaml")) or {}).get("stages", {})
        per_seed = _stage_output(stages, AGGREGATE_STAGE, PER_SEED_OPTION)
        if per_seed and fs.exists(per_seed):
            try:
                runs = [(run["seed"], run["metrics"]) for run in json.loads(fs.read_text(per_seed))["seeds"]]
            except (KeyError, TypeError, ValueError) as error:
                raise CompareError(f"{per_seed} in {name} is not the aggregate stage's per-seed JSON ({error!r}); rerun `dvc repro` there") from None
            return _side(name, runs, per_seed)
        paths = [_stage_output(stages, stage, option) for stage, option in SINGLE_RUN_METRICS]
        if not all(paths) or not all(fs.exists(path) for path in paths):
            raise CompareError(f"{name} has no metrics from the train and evaluate stages: run `dvc repro` there first")
        metrics: dict[str, Any] = {}
        for path in paths:
            metrics.update(json.loads(fs.read_text(path)))
        provenance = _stage_output(stages, *SINGLE_RUN_PROVENANCE)
        seed = json.loads(fs.read_text(provenance)).get("seed") if provenance and fs.exists(provenance) else None
        return _side(name, [(seed, metrics)], " + ".join(paths))
    except (RevError, DvcException) as error:
        raise CompareError(f"cannot read {name!r} through DVC ({error}): name a git revision, a DVC experiment (`dvc exp show`) or `workspace`") from None


def _side(name: str, runs: list[tuple[int | None, dict[str, Any]]], source: str) -> Side:
    runs = sorted(runs, key=lambda run: (run[0] is None, run[0] or 0))
    flat = [measurements(metrics) for _, metrics in runs]
    names = [metric for metric in flat[0] if all(metric in other for other in flat)]
    return Side(name, tuple(seed for seed, _ in runs), {metric: [float(values[metric]) for values in flat] for metric in names}, source)


# --------------------------------------------------------------------------- the comparison


def higher_is_better(metric: str) -> bool | None:
    split, _, name = metric.rpartition(".")
    if split not in catalogue.SPLITS:
        return None
    return name in catalogue.HIGHER_IS_BETTER_METRICS


def choose_test(a: Side, b: Side, requested: str) -> str:
    """`paired` when both sides ran the same (known) seeds, else `welch`; `none` with a single seed on a side."""
    if a.n < 2 or b.n < 2:
        return "none"
    same_seeds = a.seeds == b.seeds and None not in a.seeds
    if requested == "paired" and not same_seeds:
        raise CompareError(f"--test paired needs the same seeds on both sides: {a.name} ran {_seed_list(a)}, {b.name} ran {_seed_list(b)}")
    if requested == "auto":
        return "paired" if same_seeds else "welch"
    return requested


def compare(a: Side, b: Side, primary: str, requested_test: str = "auto") -> Comparison:
    kind = choose_test(a, b, requested_test)
    rows = []
    for metric in [name for name in a.values if name in b.values]:
        x, y = a.values[metric], b.values[metric]
        test = None if kind == "none" else (stats.paired(x, y) if kind == "paired" else stats.welch(x, y))
        rows.append(MetricComparison(metric, stats.summarize(x), stats.summarize(y), stats.mean(y) - stats.mean(x), higher_is_better(metric), test))
    rows.sort(key=lambda row: (row.metric != primary, _order(row.metric)))
    comparison = Comparison(a, b, kind, primary, rows)
    row = comparison.metric(primary)
    if row.higher_is_better is None:
        raise CompareError(f"{primary} has no better direction (a count): name a metric such as test.loss with --primary")
    _judge(comparison, row)
    return comparison


def _order(metric: str) -> tuple[int, str]:
    split = metric.split(".")[0]
    return (("test", "val", "train").index(split) if split in ("test", "val", "train") else 3, metric)


def _judge(comparison: Comparison, row: MetricComparison) -> None:
    a, b = comparison.a, comparison.b
    direction = "higher" if row.higher_is_better else "lower"
    if row.test is None:
        single = [side.name for side in (a, b) if side.n < 2]
        comparison.verdict = "no verdict"
        comparison.explanation = (
            f"No interval and no test: {' and '.join(single)} ran a single seed (n = 1), so there is no spread to "
            "judge the difference by. Repeat it with more seeds: set repeats.extra_seeds, e.g. "
            "`dvc exp run -S 'repeats.extra_seeds=[7,8]'`"
        )
    elif row.test.significant:
        improved = (row.difference > 0) == bool(row.higher_is_better)
        comparison.verdict = "better" if improved else "worse"
        comparison.explanation = f"The 95 % interval of the difference excludes 0: {b.name} is {comparison.verdict} than {a.name} on {row.metric} ({direction} is better)"
    else:
        comparison.verdict = VERDICTS[2]
        comparison.explanation = f"The 95 % interval of the difference in {row.metric} includes 0"
    _seeds_needed(comparison, row)


def _seeds_needed(comparison: Comparison, row: MetricComparison) -> None:
    a, b = comparison.a.values[row.metric], comparison.b.values[row.metric]
    if comparison.test_kind == "paired":
        spread = stats.sample_std([y - x for x, y in zip(a, b)])
        basis = "the spread of the per-seed differences (paired)"
    elif comparison.test_kind == "welch":
        spread = stats.pooled_std(a, b)
        basis = "the pooled spread of both sides (Welch)"
    elif max(len(a), len(b)) >= 2:
        spread = stats.sample_std(a if len(a) >= 2 else b)
        basis = f"the spread of {comparison.a.name if len(a) >= 2 else comparison.b.name}, the side with repeats, for both sides"
    else:
        comparison.seeds_needed_note = "unknown: neither side has repeats, so the seed-to-seed spread is unknown"
        return
    comparison.seeds_needed = stats.seeds_needed(row.difference, spread, comparison.test_kind == "paired")
    if comparison.seeds_needed is None:
        comparison.seeds_needed_note = "none would: the difference is 0 or no spread was measured" if row.difference == 0 or spread == 0 else f"more than {stats.MAX_SEEDS}"
    else:
        comparison.seeds_needed_note = (
            f"{comparison.seeds_needed} per side would find a difference of {_signed(row.difference)} in {row.metric} "
            f"with {stats.POWER * 100:.0f} % power at the 5 % level, given {basis} ({_number(spread)})"
        )


# --------------------------------------------------------------------------- output


def _number(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 1:
        return f"{value:g}"
    return f"{value:.5g}"


def _signed(value: float) -> str:
    return f"{value:+.3g}"


def _seed_list(side: Side) -> str:
    return ", ".join("?" if seed is None else str(seed) for seed in side.seeds)


def _mean_cell(summary: stats.Summary) -> str:
    return _number(summary.mean) if summary.std is None else f"{_number(summary.mean)} ± {_number(summary.std)}"


def _interval(row: MetricComparison) -> str:
    if row.test is None:
        return "no interval (n = 1)"
    return f"[{_signed(row.test.ci95_low)}, {_signed(row.test.ci95_high)}]"


def _p(row: MetricComparison) -> str:
    return "-" if row.test is None or math.isnan(row.test.p_value) else f"{row.test.p_value:.3g}"


def _header(comparison: Comparison) -> list[str]:
    a, b = comparison.a, comparison.b
    test = {"paired": "paired t-test (same seeds on both sides)", "welch": "Welch's t-test", "none": "no test (a single seed on a side)"}[comparison.test_kind]
    return [
        f"{a.name}: {a.n} seed(s) ({_seed_list(a)}) from {a.source}",
        f"{b.name}: {b.n} seed(s) ({_seed_list(b)}) from {b.source}",
        f"difference = {b.name} - {a.name}, mean ± std over seeds, 95 % interval of the difference: {test}",
    ]


def render_text(comparison: Comparison) -> str:
    a, b = comparison.a, comparison.b
    header = ["metric", a.name, b.name, "difference", "95 % interval", "p"]
    rows = [
        [f"{row.metric}{' (primary)' if row.metric == comparison.primary else ''}", _mean_cell(row.a), _mean_cell(row.b), _signed(row.difference), _interval(row), _p(row)]
        for row in comparison.metrics
    ]
    widths = [max(len(line[column]) for line in [header, *rows]) for column in range(len(header))]
    table = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in [header, *rows]]
    lines = _header(comparison) + [""] + table + [""]
    lines.append(f"verdict on {comparison.primary}: {comparison.verdict}. {comparison.explanation}.")
    lines.append(f"seeds needed: {comparison.seeds_needed_note}.")
    lines.append("The other metrics are descriptive: no verdict, so a dozen correlated metrics do not give chance findings.")
    return "\n".join(lines)


def render_markdown(comparison: Comparison) -> str:
    a, b = comparison.a, comparison.b
    lines = [f"### {b.name} against {a.name}: **{comparison.verdict}** on `{comparison.primary}`", ""]
    lines += [f"- {line}" for line in _header(comparison)]
    lines += ["", f"| metric | {a.name} | {b.name} | difference | 95 % interval | p |", "|---|---:|---:|---:|---:|---:|"]
    for row in comparison.metrics:
        name = f"**{row.metric}** (primary)" if row.metric == comparison.primary else row.metric
        lines.append(f"| {name} | {_mean_cell(row.a)} | {_mean_cell(row.b)} | {_signed(row.difference)} | {_interval(row)} | {_p(row)} |")
    lines += ["", f"**Verdict on `{comparison.primary}`: {comparison.verdict}.** {comparison.explanation}.", "", f"Seeds needed: {comparison.seeds_needed_note}.", ""]
    lines.append("_The other metrics are descriptive: no verdict, so a dozen correlated metrics do not give chance findings._")
    return "\n".join(lines)


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else value


def as_json(comparison: Comparison) -> dict[str, Any]:
    def side(s: Side) -> dict[str, Any]:
        return {"name": s.name, "seeds": list(s.seeds), "n": s.n, "source": s.source}

    metrics = {}
    for row in comparison.metrics:
        metrics[row.metric] = {
            "a": row.a.scalars(),
            "b": row.b.scalars(),
            "difference": row.difference,
            "higher_is_better": row.higher_is_better,
            "ci95_low": _finite(row.test.ci95_low) if row.test else None,
            "ci95_high": _finite(row.test.ci95_high) if row.test else None,
            "t": _finite(row.test.t) if row.test else None,
            "df": _finite(row.test.df) if row.test else None,
            "p_value": _finite(row.test.p_value) if row.test else None,
            "primary": row.metric == comparison.primary,
        }
    return {
        "a": side(comparison.a),
        "b": side(comparison.b),
        "test": comparison.test_kind,
        "primary_metric": comparison.primary,
        "verdict": comparison.verdict,
        "explanation": comparison.explanation,
        "seeds_needed": comparison.seeds_needed,
        "seeds_needed_note": comparison.seeds_needed_note,
        "metrics": metrics,
    }


def is_worse(comparison: Comparison, metric: str) -> bool:
    row = comparison.metric(metric)
    if row.higher_is_better is None:
        raise CompareError(f"--fail-if-worse {metric}: a count has no worse direction; name a metric such as {comparison.primary}")
    return row.test is not None and row.test.significant and (row.difference > 0) != row.higher_is_better


# --------------------------------------------------------------------------- command line


def pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    if not names:
        return [("HEAD", WORKSPACE)]
    if len(names) == 1:
        return [(names[0], WORKSPACE)]
    return [(names[0], other) for other in names[1:]]


def default_primary(repo: Path) -> str:
    try:
        return load_params(repo / PARAMS_FILE).primary_metric()
    except ParamsError as error:
        raise CompareError(f"no primary metric: {error} (or name one with --primary)") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tapework.compare",
        description="Compare the per-seed results of git revisions or DVC experiments: means, the difference with its "
        "95%% interval, and a verdict on the primary metric. No argument: HEAD against the workspace; one: it "
        "against the workspace; more: the first against each of the others.",
    )
    parser.add_argument("revisions", nargs="*", metavar="REV_OR_EXP", help=f"a git revision, a DVC experiment name or `{WORKSPACE}`")
    parser.add_argument("--primary", metavar="METRIC", help="the metric to judge (default: repeats.primary_metric in params.yaml for the task)")
    parser.add_argument("--test", choices=("auto", "paired", "welch"), default="auto", help="auto (default): paired when both sides ran the same seeds, else Welch")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--md", action="store_true", help="Markdown, for a pull-request comment")
    output.add_argument("--json", action="store_true", help="JSON, for scripts")
    parser.add_argument("--fail-if-worse", metavar="METRIC", help="exit 1 when METRIC is worse (its 95%% interval excludes 0) on any comparison")
    parser.add_argument("--repo", type=Path, default=Path("."), help="the project (default: the current folder)")
    args = parser.parse_args(argv)
    try:
        primary = args.primary or default_primary(args.repo)
        sides: dict[str, Side] = {}
        comparisons = []
        for first, second in pairs(args.revisions):
            for name in (first, second):
                if name not in sides:
                    sides[name] = read_side(args.repo, name)
            comparisons.append(compare(sides[first], sides[second], primary, args.test))
        worse = [c for c in comparisons if args.fail_if_worse and is_worse(c, args.fail_if_worse)]
    except CompareError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    if args.json:
        print(json.dumps([as_json(c) for c in comparisons], indent=2, sort_keys=True))
    else:
        print("\n\n".join((render_markdown if args.md else render_text)(c) for c in comparisons))
    if worse:
        print(f"{args.fail_if_worse} is worse in: {', '.join(f'{c.b.name} against {c.a.name}' for c in worse)}", file=sys.stderr)
        return EXIT_WORSE
    return 0


if __name__ == "__main__":
    sys.exit(main())
