"""What the benchmark scripts print about the machine they measured on."""

from __future__ import annotations

import os

from tapework.provenance import cpu_kind, package_versions


def machine_description() -> str:
    """CPU model, usable cores and the versions that set the numbers, in one line."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = package_versions()
    return (
        f"{cpu_kind()['model']}, {cores} cores, TensorFlow {versions.get('tensorflow-cpu') or versions.get('tensorflow')}, "
        f"Keras {versions['keras']}, Python {versions['python']}"
    )
