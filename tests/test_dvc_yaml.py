"""dvc.yaml stays honest: each stage depends on exactly the code it runs and the params it reads."""

import ast
import shlex
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def tapework_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "tapework":  # from tapework import parsers
            found.update(f"tapework.{alias.name}" for alias in node.names if (ROOT / "tapework" / f"{alias.name}.py").is_file())
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tapework."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("tapework."))
    return found


def code_closure(script: Path) -> set[str]:
    """The stage script, its package's __init__.py (`python -m stages.<verb>` runs it first), and
    every tapework module they import, directly or not."""
    package_init = script.parent / "__init__.py"
    seen, pending = {package_init}, [script, package_init]
    while pending:
        current = pending.pop()
        for module in tapework_imports(current):
            path = ROOT / (module.replace(".", "/") + ".py")
            if path not in seen:
                seen.add(path)
                pending.append(path)
    return {str(path.relative_to(ROOT)) for path in seen | {script}}


# A stage `<verb>_seed` runs `stages.<verb>` once per seed of repeats.extra_seeds (DVC's matrix).
SEED_SUFFIX = "_seed"
SEED_MATRIX = {"seed": "${repeats.extra_seeds}"}
SEED_ITEM = "${item.seed}"


def script_of(name: str) -> str:
    """The stage script a stage runs: `stages.<name>`, or `stages.<verb>` for a per-seed stage `<verb>_seed`."""
    return name.removesuffix(SEED_SUFFIX)


def test_each_stage_depends_on_exactly_the_code_it_imports():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        code_deps = {dep for dep in stage["deps"] if dep.endswith(".py")}
        expected = code_closure(ROOT / "stages" / f"{script_of(name)}.py")
        assert code_deps == expected, f"stage {name}: missing {sorted(expected - code_deps)}, extra {sorted(code_deps - expected)}"


# Passed to the train stage but deliberately not DVC outputs: DVC would delete them before each
# run, and resuming needs the checkpoints of the interrupted run.
UNTRACKED_ARGUMENTS = {"--checkpoints", "--logs"}
# Options that are not paths: the per-seed stages' seed.
VALUE_ARGUMENTS = {"--seed"}
# The aggregate stage names each extra seed's files as patterns relative to its `--runs` folder.
SEED_PATTERN = "{seed}"


def seed_patterns(stage: dict) -> dict[str, str]:
    """The stage's `--option PATTERN` pairs whose value holds `{seed}`, as full paths under its `--runs` folder."""
    options = command_options(stage)
    return {option: f"{options['--runs']}/{value}" for option, value in options.items() if SEED_PATTERN in value}


def command_options(stage: dict) -> dict[str, str]:
    words = shlex.split(stage["cmd"])
    return dict(zip(words[3::2], words[4::2]))


def declared_paths(stage: dict) -> set[str]:
    paths = set()
    for kind in ("deps", "outs", "metrics", "plots"):
        for entry in stage.get(kind, []) or []:
            paths.add(entry if isinstance(entry, str) else next(iter(entry)))
    return {path for path in paths if not path.endswith(".py")}


def test_each_stage_command_passes_exactly_its_declared_data_paths():
    """dvc.yaml is the one place paths are written: the command passes them, deps/outs declare them."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        words = shlex.split(stage["cmd"])
        # `-m` from the repository root: the checkout's own tapework is imported, never another one's.
        assert words[:3] == ["python", "-m", f"stages.{script_of(name)}"], stage["cmd"]
        options = command_options(stage)
        assert all(option.startswith("--") for option in options), stage["cmd"]
        skipped = UNTRACKED_ARGUMENTS | VALUE_ARGUMENTS | set(seed_patterns(stage))
        passed = {path for option, path in options.items() if option not in skipped}
        # The params-check stamp is an order-only dependency: it puts the check first, nobody reads it.
        declared = declared_paths(stage) - (CHECK_STAMP if name != "check_params" else set())
        assert passed == declared, f"stage {name}: passed {sorted(passed)}, declared {sorted(declared)}"


CHECK_STAMP = {"data/params.ok"}


def test_params_check_comes_first_and_reads_every_section():
    """check_params validates all of params.yaml before any stage that DVC would clear, and imports no TensorFlow."""
    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    stages = dvc_yaml["stages"]
    check = stages["check_params"]
    assert set(check["params"]) == set(yaml.safe_load((ROOT / "params.yaml").read_text()))
    assert CHECK_STAMP == {next(iter(entry)) for entry in check["outs"]}
    assert all(next(iter(entry.values())).get("persist") for entry in check["outs"])
    assert "data/params.ok" in stages["download"]["deps"]
    heavy = {"tapework/" + name for name in ("models.py", "loop.py", "training.py", "batching.py", "metrics.py")}
    assert not heavy & set(check["deps"])
    for dep in check["deps"]:
        if dep.endswith(".py"):
            imported = set()
            for node in ast.walk(ast.parse((ROOT / dep).read_text())):
                if isinstance(node, ast.Import):
                    imported.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module:
                    imported.add(node.module.split(".")[0])
            assert not imported & {"tensorflow", "keras"}, dep


def test_no_module_spells_a_pipeline_path():
    """Paths live in dvc.yaml: the package and the stage scripts never name them."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    paths = {path for stage in stages.values() for path in declared_paths(stage)} | {"checkpoints", "logs"}
    for source in [*(ROOT / "tapework").glob("*.py"), *(ROOT / "stages").glob("*.py")]:
        literals = {node.value for node in ast.walk(ast.parse(source.read_text())) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
        spelled = sorted(literals & paths)
        assert not spelled, f"{source.relative_to(ROOT)} spells {spelled}; take the path from the stage's arguments"


def test_per_seed_stages_mirror_the_single_run_stages():
    """`<verb>_seed` is `<verb>` once per extra seed: same script, options and reads, its own seed and
    output paths (so seeds never share a file), and every train.* key but train.seed as params."""
    import dataclasses

    from tapework.params import TrainParams

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    per_seed = {name: stage for name, stage in stages.items() if name.endswith(SEED_SUFFIX)}
    assert set(per_seed) == {"train_seed", "evaluate_seed"}
    for name, stage in per_seed.items():
        single = stages[script_of(name)]
        assert stage["matrix"] == SEED_MATRIX, name
        options = command_options(stage)
        assert options["--seed"] == SEED_ITEM, name
        assert set(options) == set(command_options(single)) | {"--seed"}, name
        outs = declared_paths({"outs": stage.get("outs", [])})
        assert outs and all(SEED_ITEM in path for path in outs), f"{name}: every output must be per seed: {sorted(outs)}"
        single_inputs = {dep for dep in single["deps"] if dep not in declared_paths({"outs": [o for s in stages.values() for o in s.get("outs", []) + s.get("metrics", [])]})}
        assert single_inputs - {"data/params.ok"} <= set(stage["deps"]), name  # the same code and prepared data
        assert "metrics" not in stage and "plots" not in stage, f"{name}: per-seed files are plain outputs; only the aggregate is a metric"
    every_train_key_but_seed = {f"train.{field.name}" for field in dataclasses.fields(TrainParams)} - {"train.seed"}
    other_sections = set(stages["train"]["params"]) - {"train"}  # what else the train script reads (checkpoints retention)
    assert set(per_seed["train_seed"]["params"]) == every_train_key_but_seed | other_sections
    assert per_seed["evaluate_seed"]["params"] == stages["evaluate"]["params"]


def test_the_aggregate_reads_every_seed_and_is_the_only_new_metric():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    aggregate = stages["aggregate"]
    runs = command_options(aggregate)["--runs"]
    assert runs in aggregate["deps"]
    seed_outs = {path for name in ("train_seed", "evaluate_seed") for path in declared_paths({"outs": stages[name]["outs"]})}
    assert all(path.startswith(f"{runs}/") for path in seed_outs), "the aggregate's --runs folder must hold every extra seed's outputs"
    for option, pattern in seed_patterns(aggregate).items():
        assert pattern.replace(SEED_PATTERN, SEED_ITEM) in seed_outs, f"{option} {pattern} is no per-seed output"
    assert (ROOT / runs / ".gitignore").is_file(), f"{runs}/ must exist in every clone: the aggregate depends on it"
    # Its single-run inputs are the train and evaluate stages' results at today's paths.
    single = command_options(stages["train"])["--metrics"], command_options(stages["evaluate"])["--metrics"], command_options(stages["train"])["--history"]
    options = command_options(aggregate)
    assert (options["--train-metrics"], options["--evaluate-metrics"], options["--history"]) == single
    metrics = {path for stage in stages.values() for path in declared_paths({"metrics": stage.get("metrics", [])})}
    assert metrics == {"metrics/train.json", "metrics/evaluate.json", options["--metrics"]}
