"""How many hypotheses of a runtime's unquantized conversion are identical to the fp32 baseline's (issue 19's
correctness gate: at least 95 of the 100 test-other utterances), and which differ.

    python benchmarks/conversion_identity.py runs/runtimes --dataset librispeech:test-other \
        ort-fp32 ov-fp32 runs/eval-ort-fp32

The baseline is the `fp32` rows of the bench directory's results database; each other argument is a recipe
of that database or an `eval --out` directory (its utterances.jsonl).
"""

from __future__ import annotations

import argparse
import json
import sqlite3
from pathlib import Path


def database_rows(bench_dir: Path, recipe: str, dataset: str) -> dict[str, str]:
    with sqlite3.connect(bench_dir / "results.sqlite") as db:
        rows = db.execute(
            "select u.utterance_id, u.hypothesis from utterances u join tasks t on t.id = u.task_id "
            "where t.recipe = ? and t.dataset = ?",
            (recipe, dataset),
        ).fetchall()
    return dict(rows)


def eval_rows(eval_dir: Path) -> dict[str, str]:
    lines = (eval_dir / "utterances.jsonl").read_text().splitlines()
    return {row["id"]: row["hypothesis"] for row in map(json.loads, lines)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench_dir", type=Path)
    parser.add_argument("runs", nargs="+", help="recipes of the bench database, or eval output directories")
    parser.add_argument("--dataset", default="librispeech:test-other")
    args = parser.parse_args()
    baseline = database_rows(args.bench_dir, "fp32", args.dataset)
    for run in args.runs:
        rows = eval_rows(Path(run)) if Path(run).is_dir() else database_rows(args.bench_dir, run, args.dataset)
        common = sorted(set(rows) & set(baseline))
        differing = [i for i in common if rows[i].strip() != baseline[i].strip()]
        print(f"{run}: {len(common) - len(differing)} of {len(common)} identical to fp32 on {args.dataset}")
        for i in differing:
            print(f"  {i}\n    fp32: {baseline[i].strip()}\n    {run}: {rows[i].strip()}")


if __name__ == "__main__":
    main()
