"""Adds metrics to result files of ``benchmarks/ablation.py`` from the faces they already wrote (no restoring).

    python benchmarks/rescore.py runs/bfr-default/ablation.json [runs/bfr-new/ablation.json ...] --metrics ids_blur

Each row's faces are read from the folder ``ablation.py`` wrote them to (``<json folder>/<row slug>``; the input
row's links to the test set), scored against the test set's ``gt/`` with ``evaluate_folders``, and the row's mean,
interval and per-face values of each metric are added to the JSON in place, so ``benchmarks/paired.py`` compares
them as any other metric.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from clrface.bench import ablation_row_dir
from clrface.metrics.evaluate import ALL_METRICS, evaluate_folders


def rescore(result_json: Path, metrics: list[str]) -> list[tuple[str, dict[str, float]]]:
    """Adds ``metrics`` to every row of ``result_json`` (rewritten); returns (row, {metric: mean}) per row."""
    result = json.loads(result_json.read_text())
    gt = Path(result["meta"]["testset"]) / "gt"
    done = []
    for row in result["rows"]:
        folder = ablation_row_dir(result_json.parent, row["row"])
        res = evaluate_folders(folder, gt, metrics=metrics)
        names = res["per_face"]["names"]
        if row.get("per_face", {}).get("names", names) != names:
            raise SystemExit(f"{folder}: its faces are not the ones the row scored")
        for r in res["rows"]:
            row[r["metric"]] = r["value"]
            row.setdefault("ci95", {})[r["metric"]] = r.get("ci95")
            row.setdefault("per_face", {"names": names})[r["metric"]] = res["per_face"][r["metric"]]
        done.append((row["row"], {r["metric"]: r["value"] for r in res["rows"]}))
    result["meta"]["metrics"] = list(dict.fromkeys([*result["meta"].get("metrics", []), *metrics]))
    result_json.write_text(json.dumps(result, indent=2))
    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path, nargs="+", help="ablation.json files")
    ap.add_argument("--metrics", nargs="+", required=True, choices=[m for m in ALL_METRICS if m != "fid"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for path in args.results:
        for row, values in rescore(path, args.metrics):
            print(f"{path} [{row}]: " + ", ".join(f"{m} {v:.4f}" for m, v in values.items()), flush=True)


if __name__ == "__main__":
    main()
