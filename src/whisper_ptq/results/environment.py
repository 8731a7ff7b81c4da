"""The machine and library versions a measurement was taken on, recorded with every run (summary.json, the
results database): timings and int8 results depend on the CPU's instruction set and the kernels' versions."""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import resource
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

# Packages whose versions every run records, whatever its backend; each backend adds its own `requires`.
CORE_PACKAGES = ("torch", "transformers", "jiwer", "whisper-normalizer")
PACKAGE = Path(__file__).parents[1]
# whisper-ptq's code that decides a transcript (how audio is read, the model loaded, quantized and decoded):
# a stored row or a kept build computed by other code of these is another result (`code_sha256`).
TRANSCRIPT_CODE = ("backends", "engines", "models", "data", "evaluation.py", "recipes.py")


def environment(packages: Iterable[str] = ()) -> dict[str, Any]:
    """`library_versions(packages)`, the platform and CPU."""
    return {
        "versions": library_versions(packages),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_class": cpu_class(),
        "isa_caps": isa_caps(),
    }


def library_versions(packages: Iterable[str] = ()) -> dict[str, str | None]:
    """Python, the versions of CORE_PACKAGES and of `packages` (None: not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in dict.fromkeys([*CORE_PACKAGES, *packages]):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


@functools.cache  # once a process: one identity for a whole run, even if a file is edited meanwhile
def code_sha256() -> str:
    """The sha256 of TRANSCRIPT_CODE's Python source, file by file in path order."""
    digest = hashlib.sha256()
    for part in TRANSCRIPT_CODE:
        path = PACKAGE / part
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(str(file.relative_to(PACKAGE)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


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


# CPU classes whose kernels differ in kind, best first, each with the flags it needs: a CPU is of the first
# class whose flags it has. avx2-vnni (Alder Lake's AVX-VNNI) and plain avx512 (Skylake-SP) get the AVX2 plan.
CPU_CLASSES: dict[str, frozenset[str]] = {
    "amx": frozenset({"amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni"}),  # Sapphire Rapids and later
    "avx512-bf16": frozenset({"avx512_bf16", "avx512_vnni"}),  # Cooper Lake, AMD Zen 4/5
    "avx512-vnni": frozenset({"avx512_vnni"}),  # Cascade Lake, Ice Lake
    "avx2": frozenset({"avx2", "fma"}),  # Haswell to Skylake clients, AMD Zen 1-3, AVX-512 without VNNI
    "portable": frozenset(),  # ARM (Apple Silicon, Graviton), old x86: no measured plan
}
# The caps the libraries honour (oneDNN, ATen's kernels, fbgemm), lowest wins: under ONEDNN_MAX_CPU_ISA=AVX2 a
# run measures what an AVX2 CPU would choose. Each value maps to the CPU class it leaves at most.
ISA_CAPS: dict[str, dict[str, str]] = {
    "ONEDNN_MAX_CPU_ISA": {
        "SSE41": "portable",
        "AVX": "portable",
        "AVX2": "avx2",
        "AVX2_VNNI": "avx2",
        "AVX2_VNNI_2": "avx2",
        "AVX512_CORE": "avx2",
        "AVX512_CORE_VNNI": "avx512-vnni",
        "AVX512_CORE_BF16": "avx512-bf16",
        "AVX512_CORE_FP16": "avx512-bf16",
    },
    "ATEN_CPU_CAPABILITY": {"default": "portable", "avx2": "avx2"},
    "FBGEMM_ENABLE_INSTRUCTIONS": {"AVX2": "avx2", "AVX512": "avx2", "AVX512_256": "avx2"},
}
# What forces every library this tool runs to a class's kernels (set before they load): `benchmarks/speed.py
# --cpu-class avx2` measures an AVX2 CPU's choices on a bigger one. CTranslate2 and MKL honour their own.
FORCE_CLASS_ENV: dict[str, dict[str, str]] = {
    "avx2": {
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "ATEN_CPU_CAPABILITY": "avx2",
        "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "CT2_FORCE_CPU_ISA": "AVX2",
    },
    "avx512-vnni": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"},
    "avx512-bf16": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},
}


def cpu_class(flags: Iterable[str] | None = None) -> str:
    """The CPU class (a key of CPU_CLASSES) of this CPU's flags (or `flags`), lowered by the ISA caps of the
    environment (ISA_CAPS): the class whose kernels the libraries will actually run."""
    have = set(cpu_flags() if flags is None else flags)
    found = next(name for name, needs in CPU_CLASSES.items() if needs <= have)
    for variable, caps in ISA_CAPS.items():
        capped = caps.get(os.environ.get(variable, ""))
        if capped is not None and has_class(found, capped):  # a cap can only lower the class
            found = capped
    return found


def has_class(here: str, wanted: str) -> bool:
    """Whether a CPU of class `here` has the instructions of class `wanted`: x86 classes nest (an AVX-512 BF16
    CPU has VNNI, AVX-512 and AVX2), so it has those of its own class and of every class after it but portable,
    which every CPU has."""
    order = list(CPU_CLASSES)
    return wanted == "portable" or (here != "portable" and order.index(wanted) >= order.index(here))


def has_vnni() -> bool:
    """Whether oneDNN may use int8 dot-product instructions here: AVX-512 VNNI, or AVX-VNNI (Alder Lake, Zen 5),
    which the avx2 class does not name; both under ONEDNN_MAX_CPU_ISA's cap."""
    capped = os.environ.get("ONEDNN_MAX_CPU_ISA") in ("SSE41", "AVX", "AVX2", "AVX512_CORE")
    return has_class(cpu_class(), "avx512-vnni") or ("avx_vnni" in cpu_flags() and not capped)


def isa_variables() -> list[str]:
    """Every environment variable that caps a library's instruction set."""
    return list(dict.fromkeys([*ISA_CAPS, *(v for env in FORCE_CLASS_ENV.values() for v in env)]))


def isa_caps() -> dict[str, str]:
    """The instruction-set caps set in this environment, as a run records them."""
    return {v: os.environ[v] for v in isa_variables() if v in os.environ}


def force_cpu_class(name: str) -> None:
    """Make every library run the kernels of CPU class `name` (FORCE_CLASS_ENV); before torch loads, since
    the libraries read these variables once."""
    import sys

    if name not in FORCE_CLASS_ENV:
        raise ValueError(f"cannot force CPU class {name!r}; choose from {', '.join(FORCE_CLASS_ENV)}")
    if "torch" in sys.modules:
        raise RuntimeError("force_cpu_class must run before torch is imported")
    os.environ.update(FORCE_CLASS_ENV[name])


def force_cpu_class_of(argv: list[str]) -> None:
    """A benchmark's `--cpu-class NAME`, acted on before its other imports load torch (argparse comes later and
    only validates it)."""
    if "--cpu-class" in argv[:-1]:
        force_cpu_class(argv[argv.index("--cpu-class") + 1])


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
