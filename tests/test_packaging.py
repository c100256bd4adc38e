"""pyproject.toml against the lock files, and the installed package against pyproject.toml.

scripts/env.sh installs requirements.lock (or $TAPEWORK_LOCK) and then this project with
`pip install --no-deps -e .`, so nothing reconciles the two files at install time: these tests do.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import unquote, urlparse

from tools.workspace import ROOT

# name, optional [extras], == version (PEP 508 without markers: the project pins exactly).
PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?:\[(?P<extras>[^\]]*)\])?==(?P<version>[^\s;]+)$")


def normalize(name: str) -> str:
    """PEP 503 name: `tensorflow_cpu`, `TensorFlow-CPU` and `tensorflow.cpu` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def parse_pin(requirement: str) -> tuple[str, str, str]:
    match = PIN.match(requirement.strip())
    assert match, f"{requirement!r} is not an exact pin (name==version)"
    return normalize(match["name"]), match["extras"] or "", match["version"]


def lock(name: str) -> dict[str, tuple[str, str]]:
    """{normalized name: (extras, version)} of a lock file."""
    pins: dict[str, tuple[str, str]] = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            package, extras, version = parse_pin(line)
            assert package not in pins, f"{name} pins {package} twice"
            pins[package] = (extras, version)
    return pins


def installed() -> importlib.metadata.Distribution:
    """tapework's metadata as pip installed it. The checkout is on sys.path under pytest, and the
    editable build leaves a tapework.egg-info there, so the search skips the checkout itself."""
    paths = [entry for entry in sys.path if Path(entry or ".").resolve() != ROOT]
    found = list(importlib.metadata.distributions(name="tapework", path=paths))
    assert found, "tapework is not installed in this environment: run `source scripts/env.sh`"
    return found[0]


def test_every_pyproject_pin_is_the_lock_version():
    project = pyproject()["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    locked = lock("requirements.lock")
    assert requirements
    for requirement in requirements:
        package, _, version = parse_pin(requirement)
        assert package in locked, f"pyproject.toml pins {package}, which requirements.lock does not hold"
        assert version == locked[package][1], f"pyproject.toml pins {package}=={version}, requirements.lock {locked[package][1]}"


def test_build_requirements_are_pinned():
    for requirement in pyproject()["build-system"]["requires"]:
        parse_pin(requirement)


def test_gpu_lock_is_the_cpu_lock_with_tensorflow_gpu():
    """Same versions everywhere; tensorflow[and-cuda] instead of tensorflow-cpu; plus the CUDA wheels."""
    cpu, gpu = lock("requirements.lock"), lock("requirements-gpu.lock")
    assert gpu.pop("tensorflow") == ("and-cuda", cpu.pop("tensorflow-cpu")[1])
    added = {package: pin for package, pin in gpu.items() if package not in cpu}
    assert added and all(package.startswith("nvidia-") for package in added), added
    assert {package: pin for package, pin in gpu.items() if package in cpu} == cpu


def test_installed_version_is_pyproject_version():
    assert installed().version == pyproject()["project"]["version"]


def test_installed_editable_from_this_checkout():
    """tools.workspace needs a source tree (ROOT is the folder above it): env.sh installs with -e."""
    direct_url = installed().read_text("direct_url.json")
    assert direct_url, "tapework is not installed from a local folder: run `source scripts/env.sh`"
    origin = json.loads(direct_url)
    assert origin.get("dir_info", {}).get("editable") is True, origin
    source = Path(unquote(urlparse(origin["url"]).path)).resolve()
    assert source == ROOT, f"tapework is installed from {source}, not from this checkout {ROOT}"


def test_packages_import_from_outside_the_checkout(tmp_path):
    """The install, not the current folder or a sys.path edit, makes `tapework` and `tools` importable."""
    code = "import importlib.metadata, tapework, tools.workspace; print(tapework.__file__); print(tools.workspace.ROOT); print(importlib.metadata.version('tapework'))"
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    module_file, workspace_root, version = result.stdout.splitlines()
    assert Path(module_file).resolve() == ROOT / "tapework" / "__init__.py"
    assert Path(workspace_root) == ROOT
    assert version == pyproject()["project"]["version"]
