"""The paired difference of two result rows over the same faces, per metric, with its bootstrap 95 % interval.

    python benchmarks/paired.py runs/bfr-new/ablation.json "IRN^ID" runs/bfr-irn-default/ablation.json "IRN^ID"
    python benchmarks/paired.py runs/real72-new/real_world.json IRN runs/real-default/real_world.json IRN
    python benchmarks/paired.py runs/eval-fast.json - runs/eval-default.json -

Reads the JSON of ``benchmarks/ablation.py`` or ``benchmarks/real_world.py`` (each row keeps its per-face values)
or of ``clrface evaluate --json`` (one row for the whole file: its row name is ``-``);
prints, per metric, the mean of each row and of ``a - b`` with its interval. A difference means something when its
interval excludes 0. FID is a statistic of the whole set: its interval comes from ``benchmarks/fid_paired.py``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from clrface.metrics.bootstrap import paired_diff_ci


def load_row(path: Path, name: str) -> tuple[list[str], dict[str, list[float]], float | None]:
    """Row ``name`` of a result file: (face names, per-face values by metric, FID of the row or None)."""
    result = json.loads(Path(path).read_text())
    if "per_face" in result:  # clrface evaluate --json: the file is the row
        if name != "-":
            raise SystemExit(f"{path}: a `clrface evaluate` result has one row, named '-' (not {name!r})")
        result = {"meta": {}, "rows": [{"row": "-", "per_face": result["per_face"],
                                        "fid": next((r["value"] for r in result["rows"] if r["metric"] == "fid"
                                                     and r["status"] == "ok"), None)}]}
    rows = {r["row"]: r for r in result["rows"]}
    if name not in rows:
        raise SystemExit(f"{path}: no row {name!r} (rows: {', '.join(rows)})")
    row = rows[name]
    per_face = dict(row["per_face"])
    # ablation.py keeps the names beside the values; real_world.py once for all rows
    names = per_face.pop("names", None) or result["meta"]["names"]
    values = {k: v for k, v in per_face.items() if v and isinstance(v[0], (int, float))}
    fid = row.get("fid", row.get("subsets", {}).get("all", {}).get("fid"))
    return list(names), values, fid


def paired_rows(a: dict[str, list[float]], b: dict[str, list[float]]) -> list[dict[str, Any]]:
    """For every metric of both rows: {metric, a, b, diff, low, high} (means over the faces, a - b; NaNs,
    faces a metric could not score, are left out)."""
    table = []
    for metric in (k for k in a if k in b):
        diff, low, high = paired_diff_ci(a[metric], b[metric])
        table.append({"metric": metric, "a": float(np.nanmean(a[metric])), "b": float(np.nanmean(b[metric])),
                      "diff": diff, "low": low, "high": high})
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path, help="result JSON of row a")
    ap.add_argument("row_a", help="row name in a (as in its table, e.g. 'IRN^ID' or 'IRN'; "
                    "'-' for a `clrface evaluate --json` file)")
    ap.add_argument("b", type=Path, help="result JSON of row b")
    ap.add_argument("row_b", help="row name in b")
    args = ap.parse_args()
    names_a, values_a, fid_a = load_row(args.a, args.row_a)
    names_b, values_b, fid_b = load_row(args.b, args.row_b)
    if names_a != names_b:
        raise SystemExit(f"the rows hold different faces ({len(set(names_a) ^ set(names_b))} names differ, "
                         f"{len(names_a)} and {len(names_b)} faces)")
    print(f"{len(names_a)} faces; a = {args.a} [{args.row_a}], b = {args.b} [{args.row_b}]")
    print("| metric | a | b | a − b [95 % interval] |\n|---|---:|---:|---|")
    for r in paired_rows(values_a, values_b):
        print(f"| {r['metric']} | {r['a']:.4f} | {r['b']:.4f} | {r['diff']:+.4f} [{r['low']:+.4f}, {r['high']:+.4f}] |")
    if fid_a is not None and fid_b is not None:
        print(f"| fid | {fid_a:.2f} | {fid_b:.2f} | (set statistic: benchmarks/fid_paired.py) |")


if __name__ == "__main__":
    main()
