"""The Keras dtype policy for `train.mixed_precision`, and whether this machine has bfloat16 units.

`true` is float16 compute with dynamic loss scaling (tapework/optim.py), for GPUs with float16
units. `bfloat16` has float32's exponent range, so it needs no loss scaling; it pays off on CPUs
with bfloat16 instructions (x86 AVX512_BF16 or AMX-BF16, Arm BF16) and on recent GPUs. A machine
without them would emulate bfloat16 slowly, so it runs float32 instead and says so. Either way
the model's head and the loss stay float32 (tapework/models.py).
"""

from __future__ import annotations

import logging
import platform
from pathlib import Path

from tapework.provenance import CPUINFO, cpuinfo_fields

log = logging.getLogger(__name__)

# /proc/cpuinfo feature names of bfloat16 arithmetic: x86 `flags`, Arm `Features`.
BFLOAT16_FEATURES = {"avx512_bf16", "amx_bf16", "bf16"}


def cpu_has_bfloat16(cpuinfo: Path = CPUINFO) -> bool:
    fields = cpuinfo_fields(cpuinfo)
    features = set((fields.get("flags") or fields.get("Features") or "").split())
    return bool(features & BFLOAT16_FEATURES)


def dtype_policy(setting: bool | str, *, gpu: bool) -> str:
    """The Keras policy name for a `train.mixed_precision` value on this machine (`gpu`: one is visible)."""
    if setting is True:
        return "mixed_float16"
    if setting == "bfloat16":
        if gpu or cpu_has_bfloat16():
            return "mixed_bfloat16"
        log.warning(
            "train.mixed_precision = bfloat16, but this CPU (%s) has no bfloat16 instructions (%s); "
            "training in float32, so the results are those of mixed_precision: false",
            platform.processor() or platform.machine(), " or ".join(sorted(BFLOAT16_FEATURES)),
        )
    return "float32"
