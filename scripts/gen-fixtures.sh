#!/usr/bin/env bash
# Regenerate the independent reference fixtures under tests/fixtures/ (PyTorch CPU + HF transformers).
#
#   bash scripts/gen-fixtures.sh
#
# Creates the throwaway venv .venv-ref/ at the repo root if missing (git-ignored, ~5 GB), installs the
# pinned versions of scripts/fixtures/requirements.txt (a no-op when already satisfied), then runs every
# fixture generator scripts/fixtures/*.py (names starting with '_' are helpers and are skipped).
# The SmolLM2 reference runs only when weights/SmolLM2-135M-Instruct.Q4_1.gguf exists.
# Idempotent: the generators are seeded and overwrite their own outputs.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv-ref"
REQ="$ROOT/scripts/fixtures/requirements.txt"
PY="$VENV/bin/python"
GGUF="weights/SmolLM2-135M-Instruct.Q4_1.gguf"

start=$(date +%s)

if [[ ! -x "$PY" ]]; then
    echo "[gen-fixtures] creating $VENV"
    python3 -m venv "$VENV"
fi
echo "[gen-fixtures] checking pinned packages ($REQ)"
"$PY" -m pip install -q --disable-pip-version-check -r "$REQ"
"$PY" - <<'EOF'
import importlib.metadata as md
print("[gen-fixtures] versions: " + ", ".join(
    f"{p} {md.version(p)}" for p in ("torch", "transformers", "peft", "gguf", "safetensors", "numpy")))
EOF

# Keep the CPU math reproducible and the 2-core machine responsive.
export PYTHONHASHSEED=0
export TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1
export TRANSFORMERS_NO_ADVISORY_WARNINGS=1
export TQDM_DISABLE=1

ran=()
skipped=()
for script in scripts/fixtures/*.py; do
    name="$(basename "$script")"
    [[ "$name" == _* ]] && continue
    if [[ "$name" == "smollm2_reference.py" && ! -f "$GGUF" ]]; then
        echo "[gen-fixtures] skip $name: $GGUF not found (fetch it first)"
        skipped+=("$name")
        continue
    fi
    echo "[gen-fixtures] running $script"
    t0=$(date +%s)
    "$PY" "$script"
    echo "[gen-fixtures] $name done in $(( $(date +%s) - t0 )) s"
    ran+=("$name")
done

echo "[gen-fixtures] ran: ${ran[*]:-none}${skipped:+; skipped: ${skipped[*]}}"
echo "[gen-fixtures] fixture files:"
find tests/fixtures -type f ! -name README.md | sort | while read -r f; do
    printf '    %-60s %9d B\n' "$f" "$(stat -c %s "$f")"
done
du -sh tests/fixtures/*/ 2>/dev/null | sed 's/^/    /'
echo "[gen-fixtures] total $(( $(date +%s) - start )) s"
