#!/usr/bin/env bash
# Fetches MovieLens-100K as RecBole atomic files from the `recbole` wheel on PyPI (the wheel ships
# them under recbole/dataset_example/ml-100k/):
#
#   data/ml-100k/ml-100k.inter   user_id:token item_id:token rating:float timestamp:float (100,000 rows)
#   data/ml-100k/ml-100k.item    item_id:token movie_title:token_seq release_year:token class:token_seq
#   data/ml-100k/ml-100k.user    user_id:token age:token gender:token occupation:token zip_code:token
#
# data/ is git-ignored: the files are never committed. Idempotent: does nothing when all three files
# exist. Each extracted file is checked against the sha256 of the pinned wheel's copy. Environment:
#   PYTHON   python with pip (default: python3)
#   WHEEL    use this already-downloaded recbole-*.whl instead of downloading
#   FORCE=1  download and extract again even if the files exist
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VERSION="1.2.1" # contains recbole/dataset_example/ml-100k/ (checked with pip download)
OUT="data/ml-100k"
PYTHON="${PYTHON:-python3}"

if [[ -s "$OUT/ml-100k.inter" && -s "$OUT/ml-100k.item" && -s "$OUT/ml-100k.user" && "${FORCE:-0}" != 1 ]]; then
    echo "have $OUT/ml-100k.{inter,item,user}; nothing to do (FORCE=1 to fetch again)"
    exit 0
fi

mkdir -p "$OUT"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
if [[ -n "${WHEEL:-}" ]]; then
    cp "$WHEEL" "$TMP/"
    echo "using wheel $WHEEL"
else
    echo "downloading recbole==$VERSION from PyPI (wheel only, no dependencies) ..."
    "$PYTHON" -m pip download --no-deps --only-binary=:all: --disable-pip-version-check -q \
        -d "$TMP" "recbole==$VERSION"
fi
WHL="$(ls "$TMP"/recbole-*.whl | head -n 1)"

# A wheel is a zip; Python's zipfile avoids depending on the `unzip` tool. Files are written to
# *.part and renamed, so an interrupted run never leaves a truncated file that looks complete.
"$PYTHON" - "$WHL" "$OUT" <<'EOF'
import hashlib, os, sys, zipfile
whl, out = sys.argv[1:]
# sha256 of the files in recbole-1.2.1-py3-none-any.whl
expected = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
    "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
}
with zipfile.ZipFile(whl) as z:
    for name, sha in expected.items():
        member = "recbole/dataset_example/ml-100k/" + name
        try:
            data = z.read(member)
        except KeyError:
            sys.exit(f"{whl}: no {member} in the wheel")
        got = hashlib.sha256(data).hexdigest()
        if got != sha:
            print(f"warning: {member} sha256 {got} differs from the pinned wheel's {sha}", file=sys.stderr)
        dest = os.path.join(out, name)
        with open(dest + ".part", "wb") as f:
            f.write(data)
        os.replace(dest + ".part", dest)
        lines = data.count(b"\n")
        print(f"extracted {dest} ({len(data)} bytes, {lines} lines)")
EOF
echo "done: $OUT"
