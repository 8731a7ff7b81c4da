"""How fast the command line answers when no model is needed: `list`, `list --json`, `report DIR` and input
errors, each run in a fresh process several times (median, min-max). These must stay under 2 s: they import no
torch, transformers or quantization library (see docs/ARCHITECTURE.md, "What stays light").

    python benchmarks/cli_latency.py [--repeats 5] [--data-root ../shared/data]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LIMIT_S = 2.0


def cases(report_dir: Path) -> dict[str, list[str]]:
    return {
        "--help": ["--help"],
        "list": ["list"],
        "list --json": ["list", "--json"],
        f"report {report_dir.name} (no results)": ["report", str(report_dir)],
        "eval --recipe hqq:nbits=7": ["eval", "--recipe", "hqq:nbits=7"],
        "eval --recipe nope": ["eval", "--recipe", "nope"],
        "eval --dataset librispeech:nope": ["eval", "--dataset", "librispeech:nope"],
        "eval --model no/such-dir/": ["eval", "--model", "./no/such-dir"],
        "eval --batch-size 0": ["eval", "--batch-size", "0"],
        "bench missing.toml": ["bench", "missing.toml"],
        "export without --out": ["export", "--recipe", "fp32"],
    }


def time_once(args: list[str], env: dict[str, str]) -> tuple[float, int]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "whisper_ptq.cli", *args], capture_output=True, env=env)
    return time.perf_counter() - start, done.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs of each case")
    parser.add_argument("--data-root", default=os.environ.get("WHISPER_PTQ_DATA"), help="the data root")
    args = parser.parse_args()
    env = {**os.environ, **({"WHISPER_PTQ_DATA": args.data_root} if args.data_root else {})}
    slow = 0
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'case':40} {'exit':>4} {'median s':>9} {'min':>6} {'max':>6}")
        for name, argv in cases(Path(tmp)).items():
            runs = [time_once(argv, env) for _ in range(args.repeats)]
            seconds = [s for s, _ in runs]
            median = statistics.median(seconds)
            slow += median >= LIMIT_S
            flag = "" if median < LIMIT_S else f"  SLOWER THAN {LIMIT_S:g} s"
            print(f"{name:40} {runs[0][1]:>4} {median:>9.2f} {min(seconds):>6.2f} {max(seconds):>6.2f}{flag}")
    return 1 if slow else 0


if __name__ == "__main__":
    sys.exit(main())
