#!/usr/bin/env python3
"""Produces docs/results.md: SASRec vs SFT vs ILRec and the ILRec ablations, 3 seeds per data set.

Usage (from the repository root, after `cargo build --release`):
    python3 scripts/results.py                      # ML-100K and Amazon Scientific, seeds 1 2 3
    python3 scripts/results.py --datasets ml-100k --seeds 1
    python3 scripts/results.py --report-only        # rebuild docs/results.md from runs/results

Every run is `ilrec train --config C` then `ilrec eval --config C --split test`; the SASRec row is
`ilrec sasrec --config C --split test` on the same evaluation users. Configs are written next to
each run (runs/results/<data set>/<method>-s<seed>/config.toml) from the base configs in
configs/results/ plus the per-method overrides below. A finished run (metrics file present) is
not run again, so the script can be interrupted and restarted. Standard library only.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# ILREC_BIN: a copy of the binary, so that rebuilding during a long run cannot mix versions.
BIN = Path(os.environ.get("ILREC_BIN", REPO / "target" / "release" / "ilrec"))
OUT = REPO / "runs" / "results"  # --runs-dir

DATASETS = {
    "ml-100k": dict(base="configs/results/ml-100k.toml", label="MovieLens-100K",
                    needs="data/ml-100k/ml-100k.inter"),
    "scientific": dict(base="configs/results/scientific.toml", label="Amazon Scientific",
                       needs="../shared/recdata/Scientific_UniSRec/Scientific.train.inter"),
}

# Method -> overrides of the base config. "ILRec" is ILREC.md's defaults; each ablation removes one
# component (w/o CPO: beta = 0 leaves plain CE on the final layer; w/o CPD: lambda = 0; w/o CRR:
# mu = 0) or takes V_N from the final layer instead of the intermediate ones.
METHODS = {
    "sft": ("SFT", {"method": "sft"}),
    "ilrec": ("ILRec", {"method": "ilrec"}),
    "wo_cpo": ("ILRec w/o CPO", {"method": "ilrec", "ilrec": {"beta": 0.0}}),
    "wo_cpd": ("ILRec w/o CPD", {"method": "ilrec", "ilrec": {"lambda": 0.0}}),
    "wo_crr": ("ILRec w/o CRR", {"method": "ilrec", "ilrec": {"mu": 0.0}}),
    "final_neg": ("ILRec, final-layer negatives", {"method": "ilrec", "ilrec": {"negatives": "final"}}),
}
METRICS = ["hit5", "hit10", "ndcg5", "ndcg10"]


def merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(d: dict) -> str:
    lines = [f"{k} = {toml_value(v)}" for k, v in d.items() if not isinstance(v, dict)]
    for k, v in d.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]"] + [f"{kk} = {toml_value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


def run(cmd: list[str], log: Path) -> float:
    t0 = time.time()
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        r = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}; see {log}")
    return time.time() - t0


def config_for(ds: str, method: str, seed: int) -> tuple[Path, dict]:
    base = tomllib.loads((REPO / DATASETS[ds]["base"]).read_text())
    root = OUT / ds
    over = {
        "output_dir": str((root / f"{method}-s{seed}").relative_to(REPO)),
        "train": {"seed": seed},
        "sasrec": {"seed": seed},
        "ids": {"cache": str((root / "semantic_ids.json").relative_to(REPO))},
        "ilrec": {"cf_model": str((root / f"sasrec-s{seed}.safetensors").relative_to(REPO))},
    }
    cfg = merge(merge(base, METHODS[method][1]), over)
    d = REPO / cfg["output_dir"]
    d.mkdir(parents=True, exist_ok=True)
    path = d / "config.toml"
    path.write_text(to_toml(cfg))
    return path, cfg


def ensure_mostpop(ds: str, seed: int) -> None:
    """The MostPop sanity row of a seed (its evaluation users), in about a second."""
    f = OUT / ds / f"mostpop-s{seed}_test.json"
    if f.exists() or not (REPO / DATASETS[ds]["needs"]).exists():
        return
    path, cfg = config_for(ds, next(iter(METHODS)), seed)
    d = REPO / cfg["output_dir"]
    run([str(BIN), "popularity", "--config", str(path), "--split", "test"], d / "log.txt")
    f.write_text((d / "mostpop_metrics_test.json").read_text())


def run_all(datasets: list[str], seeds: list[int]) -> None:
    for ds in datasets:
        if not (REPO / DATASETS[ds]["needs"]).exists():
            print(f"[results] skipping {ds}: {DATASETS[ds]['needs']} is absent")
            continue
        for seed in seeds:
            # SASRec first: the baseline row, and the CRR reward model the ILRec runs load, so
            # their train times exclude it. Any of the seed's configs names the same CF model.
            sas = OUT / ds / f"sasrec-s{seed}_test.json"
            if not sas.exists():
                path, cfg = config_for(ds, next(iter(METHODS)), seed)
                d = REPO / cfg["output_dir"]
                print(f"[results] {ds} SASRec seed {seed}", flush=True)
                t = run([str(BIN), "sasrec", "--config", str(path), "--split", "test"], d / "log.txt")
                m = json.loads((d / "sasrec_metrics_test.json").read_text())
                m["seconds"] = t
                sas.write_text(json.dumps(m, indent=1) + "\n")
            ensure_mostpop(ds, seed)
            for method in METHODS:
                path, cfg = config_for(ds, method, seed)
                d = REPO / cfg["output_dir"]
                log = d / "log.txt"
                if not (d / "metrics_test.json").exists():
                    print(f"[results] {ds} {method} seed {seed}: training", flush=True)
                    t_train = run([str(BIN), "train", "--config", str(path)], log)
                    t_eval = run([str(BIN), "eval", "--config", str(path), "--split", "test"], log)
                    (d / "times.json").write_text(json.dumps({"train_s": t_train, "eval_s": t_eval}) + "\n")


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def welch_t(a: list[float], b: list[float]) -> float:
    """Welch's t statistic of mean(a) - mean(b); nan with fewer than 2 values per side."""
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    return (statistics.fmean(a) - statistics.fmean(b)) / math.sqrt(va + vb) if va + vb > 0 else float("nan")


def report(datasets: list[str], seeds: list[int]) -> str:
    out = ["# Results: SASRec vs SFT vs ILRec at CPU scale", "",
           "Generated by `python3 scripts/results.py` (tables: do not edit by hand; the reading after them is",
           "docs/results-discussion.md). Machine: 2-core Xeon, no GPU. Test split, full ranking over every item,",
           "beam search (beam 20) constrained by the item trie for the LLM rows; mean ± standard deviation over",
           f"seeds {', '.join(map(str, seeds))} (the seed sets the training subsample, LoRA init, data order,",
           "and SASRec's init and dropout).", ""]
    verdicts = []
    for ds in datasets:
        root = OUT / ds
        rows = {}
        times = {}
        for method in METHODS:
            ms, ts = [], []
            for s in seeds:
                f = root / f"{method}-s{s}" / "metrics_test.json"
                if f.exists():
                    ms.append(json.loads(f.read_text()))
                    t = root / f"{method}-s{s}" / "times.json"
                    if t.exists():
                        ts.append(json.loads(t.read_text()))
            if ms:
                rows[method] = ms
                times[method] = ts
        for s in seeds:
            ensure_mostpop(ds, s)
        pop = [json.loads((root / f"mostpop-s{s}_test.json").read_text())
               for s in seeds if (root / f"mostpop-s{s}_test.json").exists()]
        sas = [json.loads((root / f"sasrec-s{s}_test.json").read_text())
               for s in seeds if (root / f"sasrec-s{s}_test.json").exists()]
        if not rows:
            continue
        shown = "ilrec" if "ilrec" in rows else list(rows)[-1]
        cfg_path = root / f"{shown}-s{seeds[0]}" / "config.toml"
        cfg = tomllib.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        n_users = rows[next(iter(rows))][0].get("n")
        out += [f"## {DATASETS[ds]['label']}", "",
                f"Base config: `{DATASETS[ds]['base']}`; per-run configs: `{OUT.relative_to(REPO)}/{ds}/<method>-s<seed>/config.toml`.",
                f"Evaluation users: {n_users} per seed (a subsample of the test users drawn with the seed; every row of a seed uses the same users).", "",
                "| method | seeds | Hit@5 | Hit@10 | NDCG@5 | NDCG@10 | train s | eval s |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |"]

        def fmt(ms: list[dict], key: str) -> str:
            m, s = mean_std([x[key] for x in ms])
            return f"{m:.4f} ± {s:.4f}" if not math.isnan(s) else f"{m:.4f}"

        if pop:
            out.append("| MostPop | " + str(len(pop)) + " | " + " | ".join(fmt(pop, k) for k in METRICS) + " | | |")
        if sas:
            tt = statistics.fmean(x["seconds"] for x in sas)
            out.append("| SASRec | " + str(len(sas)) + " | " + " | ".join(fmt(sas, k) for k in METRICS) + f" | {tt:.0f} (train + eval) | |")
        for method, ms in rows.items():
            ts = times.get(method, [])
            tt = f"{statistics.fmean(t['train_s'] for t in ts):.0f}" if ts else ""
            te = f"{statistics.fmean(t['eval_s'] for t in ts):.0f}" if ts else ""
            out.append(f"| {METHODS[method][0]} | {len(ms)} | " + " | ".join(fmt(ms, k) for k in METRICS) + f" | {tt} | {te} |")
        out.append("")
        if "sft" in rows and "ilrec" in rows:
            for k in ("hit10", "ndcg10"):
                a = [x[k] for x in rows["ilrec"]]
                b = [x[k] for x in rows["sft"]]
                t = welch_t(a, b)
                d = statistics.fmean(a) - statistics.fmean(b)
                verdicts.append(f"- {DATASETS[ds]['label']} {k}: ILRec − SFT = {d:+.4f}, Welch t = {t:.2f} "
                                f"({'beyond' if abs(t) > 2.78 else 'within'} seed noise at p < 0.05, 2-sided, ~4 df)")
        if cfg:
            out += [f"<details><summary>{METHODS[shown][0]} run config (seed {seeds[0]})</summary>", "", "```toml",
                    cfg_path.read_text().rstrip(), "```", "", "</details>", ""]
    out += ["## ILRec vs SFT beyond seed noise?", ""] + (verdicts or ["- no paired SFT/ILRec results yet"]) + [""]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="ml-100k,scientific")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--methods", default=",".join(METHODS), help="subset of " + ", ".join(METHODS))
    ap.add_argument("--runs-dir", default="runs/results")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--out", default="docs/results.md")
    a = ap.parse_args()
    datasets = [d for d in a.datasets.split(",") if d]
    for d in datasets:
        if d not in DATASETS:
            sys.exit(f"unknown data set {d!r} (known: {', '.join(DATASETS)})")
    seeds = [int(s) for s in a.seeds.split(",") if s]
    global OUT
    OUT = REPO / a.runs_dir
    for m in [m for m in a.methods.split(",") if m]:
        if m not in METHODS:
            sys.exit(f"unknown method {m!r} (known: {', '.join(METHODS)})")
    for m in [m for m in list(METHODS) if m not in a.methods.split(",")]:
        del METHODS[m]
    if not a.report_only:
        if not BIN.exists():
            sys.exit(f"{BIN} is missing: run `cargo build --release` first")
        t0 = time.time()
        run_all(datasets, seeds)
        print(f"[results] all runs done in {time.time() - t0:.0f} s")
    text = report(datasets, seeds)
    discussion = REPO / "docs" / "results-discussion.md"
    if discussion.exists() and a.out == "docs/results.md":  # the hand-written reading of the numbers
        text += "\n" + discussion.read_text()
    (REPO / a.out).write_text(text)
    print(text)
    print(f"[results] wrote {a.out}")


if __name__ == "__main__":
    os.environ.setdefault("RAYON_NUM_THREADS", str(os.cpu_count() or 2))
    main()
