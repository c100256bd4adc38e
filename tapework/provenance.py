"""Provenance written beside each metrics JSON: which data, params, code versions, seed, machine.

Two results with equal provenance hashes came from the same inputs; different hashes say why
they may differ (params, data, package versions or CPU kind).
"""

from __future__ import annotations

import hashlib
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from tapework.io import file_digest, stable_hash
from tapework.params import Params, to_plain
from tapework.preprocess import META_FILE

PACKAGES = ("tensorflow-cpu", "tensorflow", "keras", "numpy", "pandas", "scikit-learn", "dvc")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


CPUINFO = Path("/proc/cpuinfo")


def cpuinfo_fields(cpuinfo: Path = CPUINFO) -> dict[str, str]:
    """The first CPU's /proc/cpuinfo entries (`model name`, `flags`, Arm's `Features`, ...); empty where there is none."""
    fields: dict[str, str] = {}
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_kind() -> dict[str, str]:
    """CPU model and a hash of its feature flags: kernels (oneDNN, Eigen) pick code paths by them,
    so bitwise results are only promised between machines of the same kind."""
    fields = cpuinfo_fields()
    model = platform.processor() or "unknown"
    if model in ("unknown", platform.machine()) and "model name" in fields:
        model = fields["model name"]
    flags = " ".join(sorted(fields.get("flags", "").split()))
    return {"machine": platform.machine(), "model": model, "flags_sha256": hashlib.sha256(flags.encode()).hexdigest()[:16]}


def provenance(params: Params, section: str, prepared_dir: str | Path, seed: int, **input_hashes: str) -> dict[str, Any]:
    """Small JSON tying a metrics file to its inputs (its params section, data and other input
    hashes) and to the environment that produced it."""
    return {
        "dataset": params.download.dataset,
        "data_sha256": file_digest(Path(prepared_dir) / META_FILE),  # meta.json lists every array's hash
        **input_hashes,
        "params_section": section,
        "params_sha256": stable_hash(to_plain(getattr(params, section))),
        "seed": seed,
        "packages": package_versions(),
        "cpu": cpu_kind(),
    }
