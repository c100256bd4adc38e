"""dvc.yaml stays honest: each stage depends on exactly the code it runs and the params it reads."""

import ast
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
    """The stage script plus every tapework module it imports, directly or not."""
    seen, pending = set(), [script]
    while pending:
        current = pending.pop()
        for module in tapework_imports(current):
            path = ROOT / (module.replace(".", "/") + ".py")
            if path not in seen:
                seen.add(path)
                pending.append(path)
    return {str(path.relative_to(ROOT)) for path in seen | {script}}


def test_each_stage_depends_on_exactly_the_code_it_imports():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        code_deps = {dep for dep in stage["deps"] if dep.endswith(".py")}
        expected = code_closure(ROOT / "stages" / f"{name}.py")
        # The stage bootstrap only edits sys.path; it cannot change results.
        expected.discard("stages/_bootstrap.py")
        assert code_deps == expected, f"stage {name}: missing {sorted(expected - code_deps)}, extra {sorted(code_deps - expected)}"
