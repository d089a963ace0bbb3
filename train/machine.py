"""What machine a number was measured on: the CPU model, whether it has AVX-512 BF16, its cores.

Speeds are only comparable on the same kind of CPU (bf16 autocast runs on the AVX-512 BF16 units or
falls back to fp32), so training runs record this as MLflow tags and ``reslab bench`` in its JSON;
``reslab results export`` copies the tags into a result file.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def _cpuinfo_field(name: str) -> str | None:
    """The first value of ``name`` in /proc/cpuinfo (None where there is no such file or field)."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == name:
            return value.strip()
    return None


def cpu_model() -> str:
    """E.g. ``AMD EPYC 9R14 96-Core Processor``; the platform's name where /proc/cpuinfo has none."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_has_flag(flag: str) -> bool:
    """Whether the CPU lists ``flag`` (e.g. ``avx512_bf16``) among its features."""
    return flag in (_cpuinfo_field("flags") or "").split()


def machine_tags(torch_threads: int) -> dict[str, str]:
    """MLflow tags that say where a run was measured (string values, as tags are)."""
    return {
        "cpu_model": cpu_model(),
        "cpu_avx512_bf16": "yes" if cpu_has_flag("avx512_bf16") else "no",
        "cpu_amx_bf16": "yes" if cpu_has_flag("amx_bf16") else "no",  # bf16 matrix tiles: faster convolutions
        "cpu_cores": str(os.cpu_count() or 0),
        "torch_threads": str(torch_threads),
    }
