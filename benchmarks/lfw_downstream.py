"""Face recognition on restored LFW faces (paper Table 5 analogue).

    python benchmarks/lfw_downstream.py --model runs/pack --preset x8 --out runs/lfw
    python benchmarks/lfw_downstream.py --model runs/pack --preset bfr --out runs/lfw --limit-pairs 600

Every ``lfw128`` image that ``pairs.txt`` (LFW View 2) uses is resized to the model's S px (a no-op at 128),
degraded with a fixed seed per file (``default_rng([--seed, crc32("<Name>_<NNNN>")])``, so a face degrades the
same whatever subset is run) and restored. Presets at S px: ``bfr`` = the paper's BFR training degradation
scaled to S (``get_preset("bfr", S)``: x1-x8 at 128 px, blur, noise, JPEG); ``x8`` / ``x16`` = the ``x32``
preset scaled to S (blur sigma 0.025-2.5 px at 128, noise 0-20, no JPEG) with the down-scale fixed to 8 / 16
(x8 at 128 px is the paper's x32 at 512 px).

Rows: clean, degraded (the S-px LQ input), IRN (mode irn), full model (mode full, the model's restore.json defaults
otherwise), plus ``--row NAME=MODE[:key=val,...]`` as in ``real_world.py``. Per-face noise seeds use the face's
position in the sorted list of all View-2 images, so ``--limit-pairs`` subsets restore each face exactly as the full
run does.

Every face is embedded with the dlib ResNet descriptor (clrface port, 128-d, unit norm) and scored by cosine:
* verification: LFW View-2 10-fold accuracy (``metrics.verification.verification_accuracy``; threshold chosen on
  the other 9 folds); ``--limit-pairs N`` keeps the first N/20 matched and N/20 mismatched pairs of every fold.
* identification (closed set, ``rank_k_accuracy``): among the images used, every identity with >= 2 images puts
  its lowest-numbered image into the gallery and the others are probes; rank-1/3/5 = fraction of probes whose
  identity is among the k gallery faces most similar to it. The gallery holds only those identities (no
  distractors), so the task gets harder with more identities and is not comparable with other protocols.
* IDS vs clean: mean cosine between each row's face and the clean face.

Embeddings are cached per row in ``OUT/<preset>/emb_<row>.npz`` (keyed by a fingerprint of model, options,
preset, seed and size; new faces are added, finished ones are never recomputed; saved after every chunk so an
interrupted run resumes). Writes ``OUT/<preset>/lfw_<preset>.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clrface.bench import (
    add_row_arguments,
    embed_faces,
    machine,
    markdown_table,
    resize_square,
    restore_row,
    row_options,
    select_rows,
    slug,
)
from clrface.data.degradation import DegradationConfig, degrade, get_preset
from clrface.data.io import data_root, list_images, load_image, save_image
from clrface.device import resolve_device
from clrface.errors import ClrfaceError
from clrface.metrics.evaluate import read_pairs
from clrface.metrics.verification import rank_k_accuracy, verification_accuracy
from clrface.restorer import Restorer

DATA = data_root()
PRESETS = ("bfr", "x8", "x16")
BASE_ROWS = ("clean", "degraded")
DEFAULT_ROWS: dict[str, dict[str, Any] | None] = {
    "clean": None, "degraded": None, "IRN": {"mode": "irn"}, "full model": {"mode": "full"},
}
RANKS = (1, 3, 5)
RECOGNITION = "dlib_face_recognition_resnet_model_v1 (clrface port, 128-d), cosine; whole FFHQ crop via fixed chip"


def degradation_config(preset: str, size: int) -> DegradationConfig:
    """The degradation of ``preset`` (bfr | x8 | x16) for faces of ``size`` px (see the module docstring)."""
    if preset == "bfr":
        return get_preset("bfr", size)
    if preset in ("x8", "x16"):
        f = float(preset[1:])
        return dataclasses.replace(get_preset("x32", size), name=preset, scale=(f, f))
    raise ClrfaceError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")


def file_seed(seed: int, key: str) -> np.random.Generator:
    """The generator that degrades image ``key`` ("<Name>_<NNNN>"): independent of which other files are run."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(key.encode())])


# ------------------------------------------------------------------------------------------ pairs


def _key(name: str, n: int) -> str:
    return f"{name}_{n:04d}"


def select_pairs(pairs_file: str | Path, limit: int | None = None
                 ) -> tuple[list[tuple[str, str, bool]], int, list[tuple[str, str, bool]]]:
    """(selected pairs as (key1, key2, same), folds, all pairs) of a View-2 style ``pairs.txt``.

    The header ``<folds> <n>`` gives the folds (each: n matched, then n mismatched pairs); without one, 10.
    ``limit``: the first ceil(limit / (2 folds)) matched and mismatched pairs of every fold, in file order.
    """
    allp = [(_key(a, i), _key(b, j), s) for a, i, b, j, s in read_pairs(pairs_file)]
    head = Path(pairs_file).read_text().splitlines()[0].split()
    folds = int(head[0]) if len(head) == 2 and all(h.isdigit() for h in head) else 10
    if not allp:
        raise ClrfaceError(f"{pairs_file}: no pairs")
    if limit is None or limit >= len(allp):
        return allp, folds, allp
    k = max(1, -(-limit // (2 * folds)))
    chunks = np.array_split(np.arange(len(allp)), folds)
    sel = []
    for idx in chunks:
        fold = [allp[i] for i in idx]
        sel += [p for p in fold if p[2]][:k] + [p for p in fold if not p[2]][:k]
    return sel, folds, allp


def identification_split(keys: Sequence[str]) -> tuple[list[str], list[str]]:
    """(gallery, probes): per identity with >= 2 images, its lowest-numbered image, and the rest."""
    by_id: dict[str, list[str]] = {}
    for k in sorted(keys):
        by_id.setdefault(k.rsplit("_", 1)[0], []).append(k)
    gallery = [v[0] for v in by_id.values() if len(v) >= 2]
    probes = [k for v in by_id.values() if len(v) >= 2 for k in v[1:]]
    return gallery, probes


# ------------------------------------------------------------------------------------------ cache


def _fingerprint(**parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class EmbeddingCache:
    """key -> unit embedding of one row, in ``path`` (.npz with keys, emb, fingerprint, seconds, n_timed)."""

    def __init__(self, path: Path, fingerprint: str):
        self.path, self.fingerprint = path, fingerprint
        self.emb: dict[str, np.ndarray] = {}
        self.seconds, self.n_timed = 0.0, 0
        if path.is_file():
            d = np.load(path, allow_pickle=False)
            if str(d["fingerprint"]) == fingerprint:
                self.emb = dict(zip(d["keys"].tolist(), d["emb"]))
                self.seconds, self.n_timed = float(d["seconds"]), int(d["n_timed"])

    def add(self, keys: Sequence[str], emb: np.ndarray, seconds: float = 0.0, timed: bool = False) -> None:
        self.emb.update(zip(keys, np.asarray(emb, np.float32)))  # as stored: cached and fresh runs agree
        if timed:
            self.seconds += seconds
            self.n_timed += len(keys)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = sorted(self.emb)
        tmp = self.path.with_name(self.path.stem + ".tmp.npz")
        np.savez(tmp, keys=np.array(keys), emb=np.stack([self.emb[k] for k in keys]).astype(np.float32),
                 fingerprint=self.fingerprint, seconds=self.seconds, n_timed=self.n_timed)
        tmp.replace(self.path)

    def stack(self, keys: Sequence[str]) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.emb[k] for k in keys])).double()


def _model_stamp(source: str | None) -> list:
    if source is None or not Path(source).is_dir():
        return [source]
    return [source] + sorted((str(p.relative_to(source)), p.stat().st_size, p.stat().st_mtime_ns)
                             for p in Path(source).rglob("*.safetensors"))


# ------------------------------------------------------------------------------------------ scoring


def verification(emb: EmbeddingCache, pairs: Sequence[tuple[str, str, bool]], folds: int) -> dict[str, float]:
    a, b = emb.stack([p[0] for p in pairs]), emb.stack([p[1] for p in pairs])
    sims = (a * b).sum(-1)
    same = np.array([p[2] for p in pairs])
    acc, std = verification_accuracy(sims, same, folds)
    s = sims.numpy()
    return {"accuracy": acc, "std": std, "cos_same": float(s[same].mean()) if same.any() else None,
            "cos_diff": float(s[~same].mean()) if (~same).any() else None}


def identification(emb: EmbeddingCache, gallery: Sequence[str], probes: Sequence[str]) -> dict[str, float] | None:
    if not gallery or not probes:
        return None
    ident = lambda ks: [k.rsplit("_", 1)[0] for k in ks]  # noqa: E731
    r = rank_k_accuracy(emb.stack(gallery), ident(gallery), emb.stack(probes), ident(probes), ks=RANKS)
    return {f"rank{k}": v for k, v in r.items()}


# ------------------------------------------------------------------------------------------ main


def run(model: str | Path | None, out: str | Path, *, preset: str = "bfr", lfw: str | Path = DATA / "lfw128",
        pairs: str | Path | None = None, rows: dict[str, dict[str, Any] | None] | None = None,
        limit_pairs: int | None = None, seed: int = 0, device: str = "cpu", batch_size: int = 8,
        chunk: int = 256, save_examples: int = 8, restorer: Restorer | None = None,
        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The benchmark; returns (and writes to ``out/<preset>/lfw_<preset>.json``) the result dict."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    lfw, out = Path(lfw), Path(out) / preset
    pairs = Path(pairs) if pairs is not None else lfw / "pairs.txt"
    restorer = restorer or Restorer.from_pretrained(model, resolve_device(device))
    s = restorer.resolution
    cfg = degradation_config(preset, s)
    rows = dict(DEFAULT_ROWS if rows is None else rows)

    index = {f.stem: f for f in list_images(lfw, recursive=True)}
    sel, folds, allp = select_pairs(pairs, limit_pairs)
    n_sel = len(sel)
    sel = [p for p in sel if p[0] in index and p[1] in index]
    if len(sel) < folds:
        raise ClrfaceError(f"{lfw}: only {len(sel)} pairs have both images; need >= {folds}")
    all_keys = sorted({k for p in allp for k in p[:2] if k in index})
    gidx = {k: i for i, k in enumerate(all_keys)}
    keys = sorted({k for p in sel for k in p[:2]}, key=gidx.__getitem__)
    gallery, probes = identification_split(keys)

    stamp = {"lfw": str(lfw.resolve()), "size": s}
    caches: dict[str, EmbeddingCache] = {}
    specs: dict[str, tuple[Any, bool] | None] = {}
    for row in dict.fromkeys(["clean", *rows]):  # clean always: IDS vs clean needs it
        spec = rows.get(row) if row != "clean" else None
        fp: dict[str, Any] = dict(stamp, row=row)
        if row == "degraded" or spec is not None:
            fp.update(preset=dataclasses.asdict(cfg), seed=seed)
        if spec is not None:
            opts, use_mask = row_options(spec, batch_size, restorer.defaults)
            specs[row] = (opts, use_mask and restorer.mask is not None)
            fp.update(options=dataclasses.asdict(opts) | {"batch_size": None}, mask=specs[row][1],
                      model=_model_stamp(restorer.source))
        else:
            specs[row] = None
        # clean faces do not depend on the preset: one cache beside the preset folders
        path = out.parent / "emb_clean.npz" if row == "clean" else out / f"emb_{slug(row)}.npz"
        caches[row] = EmbeddingCache(path, _fingerprint(**fp))
    status: dict[str, str] = {}
    for row, sp in specs.items():
        if sp is not None and sp[0].mode == "irn" and restorer.irn is None:
            status[row] = f"skipped: mode 'irn' needs an irn/ checkpoint in {restorer.source}"
    todo = [k for k in keys if any(k not in c.emb for r, c in caches.items() if r not in status)]
    log(f"{len(keys)} images in {len(sel)} pairs; {len(todo)} need work")
    examples = set(keys[:save_examples])
    for c0 in range(0, len(todo), chunk):
        ks = todo[c0:c0 + chunk]
        clean = np.stack([resize_square(load_image(index[k]), s) for k in ks])
        deg = None
        for row, cache in caches.items():
            miss = [i for i, k in enumerate(ks) if k not in cache.emb]
            if row in status or not miss:
                continue
            if row != "clean" and deg is None:
                deg = np.stack([degrade(c, cfg, file_seed(seed, k))[0] for c, k in zip(clean, ks)])
            faces = clean[miss] if row == "clean" else deg[miss]
            dt, timed = 0.0, False
            if specs[row] is not None:
                opts, use_mask = specs[row]
                try:
                    faces, dt = restore_row(restorer, faces, opts, use_mask, indices=[gidx[ks[i]] for i in miss])
                    timed = True
                except ClrfaceError as e:
                    status[row] = f"skipped: {e}"
                    continue
            cache.add([ks[i] for i in miss], embed_faces(restorer, faces).numpy(), dt * len(miss), timed)
            cache.save()
            for i, f in zip(miss, faces):
                if ks[i] in examples:
                    save_image(out / "examples" / slug(row) / f"{ks[i]}.png", f)
        log(f"embedded {min(c0 + chunk, len(todo))}/{len(todo)}")

    clean_c = caches["clean"]
    result_rows = []
    for row in rows:
        c = caches[row]
        if row in status:
            result_rows.append({"row": row, "status": status[row]})
            continue
        e, e_clean = c.stack(keys), clean_c.stack(keys)
        result_rows.append({
            "row": row, "status": "ok", "spec": rows[row],
            "verification": verification(c, sel, folds), "identification": identification(c, gallery, probes),
            "ids_vs_clean": float((e * e_clean).sum(-1).mean()),
            "s_per_face": (c.seconds / c.n_timed) if c.n_timed else (0.0 if specs[row] is None else None),
        })
    result = {
        "meta": {"model": restorer.source, "resolution": s, "device": str(restorer.device),
                 "machine": machine(restorer.device), "threads": torch.get_num_threads(),
                 "torch": torch.__version__, "lfw": str(lfw), "pairs_file": str(pairs), "preset": preset,
                 "degradation": dataclasses.asdict(cfg), "seed": seed, "limit_pairs": limit_pairs},
        "protocol": {
            "verification": f"{len(sel)} pairs ({n_sel - len(sel)} skipped: image missing) of {len(allp)}, "
                            f"{folds} folds in file order, threshold best on the other folds; {RECOGNITION}",
            "identification": f"closed set: gallery {len(gallery)} identities (lowest-numbered image of each "
                              f"identity with >= 2 of the {len(keys)} images used), {len(probes)} probes (the "
                              "other images), no distractors",
            "ids_vs_clean": f"mean cosine with the clean face's descriptor over {len(keys)} images",
            "input": f"lfw128 resized to {s} px (PIL bicubic), degraded at {s} px, seed per file crc32(key)",
            "seconds": f"restoration only, per face, batch size {batch_size}, on {restorer.device}",
        },
        "n_images": len(keys), "rows": result_rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"lfw_{preset}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def format_markdown(result: dict[str, Any]) -> str:
    m, p = result["meta"], result["protocol"]
    table = []
    for r in result["rows"]:
        if r["status"] != "ok":
            table.append((r["row"], r["status"], "", "", "", "", "", ""))
            continue
        v, i = r["verification"], r["identification"] or {}
        rk = [f"{i[f'rank{k}']:.4f}" if f"rank{k}" in i else "–" for k in RANKS]
        cs = "–" if v["cos_same"] is None or v["cos_diff"] is None else f"{v['cos_same']:.3f} / {v['cos_diff']:.3f}"
        sp = "–" if r["s_per_face"] is None else f"{r['s_per_face']:.3f}"
        table.append((r["row"], f"{v['accuracy']:.4f} ± {v['std']:.4f}", *rk, f"{r['ids_vs_clean']:.4f}", cs, sp))
    columns = ["row", "verification acc ↑", *(f"rank-{k} ↑" for k in RANKS), "IDS vs clean ↑", "cos same / diff",
               "s/face"]
    lines = [f"\n**LFW, preset {m['preset']}** ({result['n_images']} images, {m['resolution']} px)\n",
             markdown_table(columns, table), "", f"Verification: {p['verification']}.",
             f"Identification: {p['identification']}.", f"Input: {p['input']}.", f"Timing: {p['seconds']}."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model folder (clrface pack) or installed model name")
    ap.add_argument("--preset", default="bfr", choices=PRESETS)
    ap.add_argument("--out", default="runs/lfw")
    ap.add_argument("--lfw", default=str(DATA / "lfw128"), help="lfw128 folder (<Name>/<Name>_NNNN.jpg)")
    ap.add_argument("--pairs", help="pairs.txt (default: LFW/pairs.txt)")
    ap.add_argument("--limit-pairs", type=int, help="about N pairs: N/20 matched + N/20 mismatched per fold")
    ap.add_argument("--seed", type=int, default=0, help="degradation seed (combined with each file's name)")
    add_row_arguments(ap)
    ap.add_argument("--save-examples", type=int, default=8, help="write the first N faces of each row as PNG")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        rows = select_rows(DEFAULT_ROWS, args.row, args.only)
        result = run(args.model, args.out, preset=args.preset, lfw=args.lfw, pairs=args.pairs, rows=rows,
                     limit_pairs=args.limit_pairs, seed=args.seed, device=args.device, batch_size=args.batch_size,
                     save_examples=args.save_examples)
    except ClrfaceError as e:
        print(f"lfw_downstream: error: {e}", file=sys.stderr)
        return 1
    print(format_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
