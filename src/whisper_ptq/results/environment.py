"""The machine and library versions a measurement was taken on, recorded with every run (summary.json, the
results database): timings and int8 results depend on the CPU's instruction set and the kernels' versions."""

from __future__ import annotations

import platform
import resource
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

# Packages whose versions every run records, whatever its backend; each backend adds its own `requires`.
CORE_PACKAGES = ("torch", "transformers", "jiwer", "whisper-normalizer")


def environment(packages: Iterable[str] = ()) -> dict[str, Any]:
    """Python, the versions of CORE_PACKAGES and of `packages` (None: not installed), the platform and CPU."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in dict.fromkeys([*CORE_PACKAGES, *packages]):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "versions": versions,
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
    }


def cpu_model() -> str:
    for line in _cpuinfo():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def cpu_flags() -> list[str]:
    """The instruction-set flags that decide which quantized kernels run (AVX-512, VNNI, AMX)."""
    for line in _cpuinfo():
        if line.startswith("flags"):
            flags = line.split(":", 1)[1].split()
            return sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")))
    return []


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
