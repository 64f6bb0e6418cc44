#!/usr/bin/env bash
# The local half of the GPU check (docs/gpu-check.md). The GPU machines have no Rust toolchain and
# no network, so everything is built here and shipped: the release `ilrec` binary, every test
# executable (`cargo test --release --no-run`) and every criterion bench (`cargo bench --no-run`),
# stripped of debug info, into the git-ignored gpu-stage/ together with gpu-stage/run.sh, the half
# that runs there. Prints the one command to run on the GPU machine.
#
# What travels must stay under 64 MiB (the device tool's limit for the working tree plus carried
# paths): ~20 test executables link the whole engine (~4-9 MB each even without debug info), so
# they and the benches travel as one xz archive (gpu-stage/bin.tar.xz, unpacked by run.sh); the
# `ilrec` binary stays unpacked so `gpu-stage/ilrec selftest` also works by hand.
#
# Usage: bash scripts/gpu-check.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$(pwd -P)
stage=gpu-stage
limit=$((64 * 1024 * 1024))

die() { echo "gpu-check: $*" >&2; exit 1; }
for tool in cargo python3 objcopy tar xz git; do
    command -v "$tool" >/dev/null || die "needs \`$tool\` on PATH"
done

# nvcc: without it build.rs makes a CPU-only build, and staging that would test nothing.
bash scripts/install-cuda-toolchain.sh

json=$(mktemp -d)
trap 'rm -rf "$json"' EXIT

echo "== building (release): ilrec, test executables, benches"
cargo build --release --bin ilrec --message-format=json-render-diagnostics >"$json/bin.json"
cargo test --release --no-run --message-format=json-render-diagnostics >"$json/tests.json"
cargo bench --no-run --bench '*' --message-format=json-render-diagnostics >"$json/benches.json"

# Cargo's JSON messages -> "stage-name<TAB>executable" lines, plus the check that the build embedded
# every kernels/*.cu (a build without nvcc embeds none and would "pass" by testing nothing).
python3 - "$json" "$root" <<'PY'
import glob, json, os, re, sys
jdir, root = sys.argv[1], sys.argv[2]

def messages(name):
    with open(os.path.join(jdir, name)) as f:
        for line in f:
            try:
                yield json.loads(line)
            except ValueError:
                pass

def artifacts(name, want):
    out = {}
    for m in messages(name):
        if m.get("reason") != "compiler-artifact" or not m.get("executable"):
            continue
        kind = m["target"]["kind"]
        tname = m["target"]["name"]
        if want == "bin" and "bin" in kind and not m["profile"]["test"]:
            out["ilrec"] = m["executable"]
        elif want == "tests" and m["profile"]["test"]:
            prefix = "test" if "test" in kind else "bin" if "bin" in kind else "lib" if ("lib" in kind or "rlib" in kind) else None
            if prefix:
                out[f"{prefix}-{tname}"] = m["executable"]
        elif want == "benches" and "bench" in kind:
            out[f"bench-{tname}"] = m["executable"]
    return out

bin_ = artifacts("bin.json", "bin")
tests = artifacts("tests.json", "tests")
benches = artifacts("benches.json", "benches")
if "ilrec" not in bin_:
    sys.exit("gpu-check: cargo reported no `ilrec` executable")
if not tests:
    sys.exit("gpu-check: cargo reported no test executables")
with open(os.path.join(jdir, "list.tsv"), "w") as f:
    for name, exe in [("ilrec", bin_["ilrec"])] + sorted(tests.items()) + sorted(benches.items()):
        f.write(f"{name}\t{exe}\n")

# The kernels the release build embedded (build.rs writes $OUT_DIR/kernels.rs).
embedded = set()
for m in messages("bin.json"):
    if m.get("reason") == "build-script-executed" and m.get("package_id", "").find("ilrec") >= 0:
        p = os.path.join(m["out_dir"], "kernels.rs")
        if os.path.exists(p):
            embedded |= set(re.findall(r'\(\s*"([A-Za-z0-9_]+)"\s*,\s*include_bytes!', open(p).read()))
sources = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(root, "kernels", "*.cu"))}
missing = sorted(sources - embedded)
if missing:
    sys.exit("gpu-check: the build embedded no fatbin for kernels/{%s}.cu (was nvcc found? see kernels/README.md)" % ",".join(missing))
print(f"kernels embedded: {len(embedded)} ({', '.join(sorted(embedded))})")
PY

echo "== staging into $stage/"
rm -rf "$stage"
mkdir -p "$stage/bin"
tests=() benches=()
while IFS=$'\t' read -r name exe; do
    case "$name" in
        ilrec) objcopy --strip-debug "$exe" "$stage/ilrec" ;;
        bench-*) objcopy --strip-debug "$exe" "$stage/bin/$name"; benches+=("$name") ;;
        *) objcopy --strip-debug "$exe" "$stage/bin/$name"; tests+=("$name") ;;
    esac
done <"$json/list.tsv"
unpacked=$(du -sb "$stage" | cut -f1)
tar -C "$stage" -cf - bin | xz -T0 -6 >"$stage/bin.tar.xz"
rm -rf "$stage/bin"
printf '%s\n' "${tests[@]}" >"$stage/TESTS"
printf '%s\n' "${benches[@]}" >"$stage/BENCHES"

# Which commit the binaries are (a dirty tree is said so: the table is then of uncommitted code).
commit=$(git rev-parse HEAD)
if [[ -n "$(git status --porcelain --untracked-files=no)" ]]; then
    commit="$commit-dirty ($(git status --porcelain --untracked-files=no | wc -l) modified tracked files)"
fi
echo "$commit $(git log -1 --format=%s HEAD)" >"$stage/COMMIT"
# The tests and benches find their fixtures through paths compiled in (env!("CARGO_MANIFEST_DIR")):
# run.sh links this path to the copy of the tree on the GPU machine when it does not exist there.
echo "$root" >"$stage/SRCDIR"
echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname) ($(rustc --version))" >"$stage/BUILD"

write_run_sh() {
cat <<'RUN'
#!/usr/bin/env bash
# The GPU half of the GPU check; written by scripts/gpu-check.sh (docs/gpu-check.md). Runs on the GPU
# machine from the repository root of a copy of the tree that built gpu-stage/ (no Rust needed):
# `ilrec selftest --device cuda --full`, every staged test executable, every staged bench. Never stops
# at a failure: each step's result is collected, $OUT/gpu-check.md is rewritten after every step,
# and the exit status is 1 when anything failed.
#
# Env: OUT (default gpu-out), STEP_TIMEOUT seconds per executable (default 300), SKIP_TESTS=1,
# SKIP_BENCHES=1, SKIP_PERF=1 (the PyTorch side-by-side scripts, scripts/perf/gpu_*.py).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
STAGE=gpu-stage
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
STEP_TIMEOUT="${STEP_TIMEOUT:-300}"
LOG="$OUT/gpu-check.log"
: >"$LOG" && : >"$OUT/tests.log" && : >"$OUT/benches.log"
say() { echo "$*" | tee -a "$LOG"; }
failures=()
test_rows=()
bench_log="$OUT/benches.log"
started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
tmo=()
command -v timeout >/dev/null && tmo=(timeout --kill-after=10 "$STEP_TIMEOUT")

# --- what this machine is
gpu=$(nvidia-smi -L 2>&1 | head -n 8) || gpu="nvidia-smi failed: $gpu"
driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1)
[[ -n "$driver" ]] || driver="unknown (nvidia-smi unavailable)"
say "== GPU: $gpu"
say "== driver: $driver"
say "== commit: $(cat "$STAGE/COMMIT" 2>/dev/null || echo unknown)"

# --- libcublas: PyTorch's nvidia-cublas wheel, else the system's, else the hand-written GEMM
cublas_dir=$(python3 -c '
import glob, os, re
try:
    import nvidia
    roots = list(nvidia.__path__)
except Exception:
    roots = []
def major(p):
    m = re.search(r"\.so\.(\d+)", p)
    return int(m.group(1)) if m else 0
hits = [h for r in roots for h in glob.glob(os.path.join(r, "**", "libcublas.so*"), recursive=True)]
if hits:
    print(os.path.dirname(max(hits, key=major)))
' 2>/dev/null)
if [[ -z "$cublas_dir" ]]; then
    for d in "${CUDA_HOME:-/nonexistent}/lib64" /usr/local/cuda/lib64; do
        if compgen -G "$d/libcublas.so*" >/dev/null; then cublas_dir=$d; break; fi
    done
fi
if [[ -n "$cublas_dir" ]]; then
    export LD_LIBRARY_PATH="$cublas_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    gemm_line="cuBLAS from $cublas_dir ($(cd "$cublas_dir" && ls libcublas.so* | tr '\n' ' '))"
elif ldconfig -p 2>/dev/null | grep -q 'libcublas\.so'; then
    gemm_line="cuBLAS from the system library path"
else
    gemm_line="no libcublas found: dense GEMMs use the hand-written fallback (kernels/gemm.cu)"
fi
say "== GEMM: $gemm_line"

# --- the fixture paths compiled into the tests and benches
src=$(cat "$STAGE/SRCDIR" 2>/dev/null || true)
linked=""
if [[ -n "$src" && "$src" != "$(pwd -P)" ]]; then
    if [[ ! -e "$src" ]]; then
        if mkdir -p "$(dirname "$src")" 2>/dev/null && ln -s "$(pwd -P)" "$src" 2>/dev/null; then
            linked=$src
            say "== linked $src -> $(pwd -P) (the fixture paths compiled into the tests; removed at exit)"
        else
            say "== warning: cannot create $src (the fixture path compiled into the tests): tests reading fixtures will fail"
        fi
    else
        say "== warning: $src exists and is not this tree: the tests read their fixtures from there"
    fi
fi
# --- unpack the executables into a temporary folder (not into gpu-stage/: unpacked they are
# ~100 MiB, too much to carry along again), removed at exit
work=$(mktemp -d "${TMPDIR:-/tmp}/ilrec-gpu-check.XXXXXX")
cleanup() {
    [[ -n "$linked" && -L "$linked" ]] && rm -f "$linked"
    rm -rf "$work"
}
trap cleanup EXIT
BIN="$work/bin"
if ! tar -C "$work" -xJf "$STAGE/bin.tar.xz" 2>>"$LOG"; then
    python3 -c 'import sys, tarfile; t = tarfile.open(sys.argv[1]); t.extractall(sys.argv[2], **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))' "$STAGE/bin.tar.xz" "$work" 2>>"$LOG" \
        || { say "FAIL: cannot unpack $STAGE/bin.tar.xz"; failures+=("unpack $STAGE/bin.tar.xz"); }
fi
# A fresh criterion folder: with an earlier run's results there, criterion adds "change:" lines.
export CRITERION_HOME="$work/criterion"

# Criterion result lines -> "| id | time | throughput |" rows.
bench_rows() {
    awk '
        function flush() { if (id != "") printf "| %s | %s | %s |\n", id, t, thr; id = ""; t = ""; thr = "" }
        /^(Benchmarking|Found|Warning|WARNING|Gnuplot|running|test |Testing|Success|cuda benches|H100)/ { next }
        /^[^ \t]/ { name = $0; sub(/[ \t]+time:.*/, "", name) }
        /change:/ { change = 2; next }
        change > 0 && /(time|thrpt):/ { change--; next }
        /time:/ { flush(); id = name; t = $0; sub(/.*time:[ \t]*/, "", t) }
        /thrpt:/ { thr = $0; sub(/.*thrpt:[ \t]*/, "", thr); flush() }
        END { flush() }
    ' "$bench_log"
}

report() {
    local md="$OUT/gpu-check.md" status
    if ((${#failures[@]})); then status="**${#failures[@]} failed**"; else status="all passed"; fi
    {
        echo "# GPU check"
        echo
        echo "- date: $started (UTC)"
        echo "- GPU: $(echo "$gpu" | paste -sd ';' -)"
        echo "- driver: $driver"
        echo "- commit: $(cat "$STAGE/COMMIT" 2>/dev/null || echo unknown)"
        echo "- build: $(cat "$STAGE/BUILD" 2>/dev/null || echo unknown)"
        echo "- GEMM: $gemm_line"
        echo "- result: $status"
        echo
        echo "## Kernel selftest (\`ilrec selftest --device cuda --full\`)"
        echo
        if [[ -s "$OUT/selftest.md" ]]; then
            sed -e '1,/^ilrec [0-9]/d' "$OUT/selftest.md"
        elif [[ -s "$OUT/selftest.log" ]]; then
            echo '```'; tail -n 20 "$OUT/selftest.log"; echo '```'
        else
            echo "(not run)"
        fi
        echo
        echo "## Test executables (\`--test-threads=1 --nocapture\`)"
        echo
        echo "| executable | result | seconds | summary |"
        echo "|---|---|---|---|"
        printf '%s\n' "${test_rows[@]}"
        echo
        echo "## Benches (\`--bench --warm-up-time 1 --measurement-time 3\`)"
        echo
        echo "| bench | time [low median high] | throughput [low median high] |"
        echo "|---|---|---|"
        [[ -s "$bench_log" ]] && bench_rows
        echo
        grep -h -E '^(cuda benches skipped|skipped|H100)' "$bench_log" 2>/dev/null | sed 's/^/- /'
        if ((${#perf_names[@]})); then
            echo
            echo "## Side by side with PyTorch (\`scripts/perf/gpu_*.py\`)"
            local n
            for n in "${perf_names[@]}"; do
                echo
                if [[ -s "$work/perf/$n.md" ]]; then cat "$work/perf/$n.md"; else echo "$n: no table written (see perf.log)"; fi
            done
        fi
        if ((${#failures[@]})); then
            echo
            echo "## Failures"
            echo
            printf -- '- %s\n' "${failures[@]}"
        fi
    } >"$md"
}

# One executable: output into its log (and ours), pass/fail into the collected results.
run_step() { # label logfile cmd...
    local label=$1 log=$2 rc
    shift 2
    say "== $label: $*"
    echo "== $label" >>"$log"
    "${tmo[@]}" "$@" 2>&1 | tee -a "$log" >>"$LOG"
    rc=${PIPESTATUS[0]}
    if ((rc == 124 || rc == 137)); then
        say "FAIL: $label: timed out after ${STEP_TIMEOUT}s"
        failures+=("$label: timed out after ${STEP_TIMEOUT}s")
    elif ((rc != 0)); then
        say "FAIL: $label: exit $rc"
        failures+=("$label: exit $rc")
    else
        say "ok: $label"
    fi
    return $rc
}

# --- 1. every kernel against the CPU reference
run_step selftest "$OUT/selftest.log" "$STAGE/ilrec" selftest --device cuda --full --out "$OUT/selftest.md"
report

# --- 2-6. the CUDA tests, the kernel benches, the PyTorch side-by-side scripts, then the other
# tests and benches: the order of
# what matters most on a GPU, should the run be cut off (the report is rewritten after each step)
run_tests() { # names...
    local t r lines_before summary skips t0
    for t in "$@"; do
        [[ -n "$t" ]] || continue
        lines_before=$(wc -l <"$OUT/tests.log")
        t0=$SECONDS
        if run_step "$t" "$OUT/tests.log" "$BIN/$t" --test-threads=1 --nocapture; then r=pass; else r=FAIL; fi
        summary=$(tail -n +"$((lines_before + 1))" "$OUT/tests.log" | grep -E '^test result:' | sed 's/^test result: //' | paste -sd ';' -)
        skips=$(tail -n +"$((lines_before + 1))" "$OUT/tests.log" | grep -ciE '(^|[^a-z])skip(ped|ping)?[: ]')
        ((skips > 0)) && summary="$summary; $skips skip line(s) in tests.log"
        test_rows+=("| $t | $r | $((SECONDS - t0)) | ${summary:-no summary line} |")
        report
    done
}
run_benches() { # names...
    local b
    for b in "$@"; do
        [[ -n "$b" ]] || continue
        run_step "$b" "$bench_log" "$BIN/$b" --bench --warm-up-time 1 --measurement-time 3
        report
    done
}
[[ "${SKIP_TESTS:-0}" == 1 ]] || run_tests $(grep -x 'test-cuda.*' "$STAGE/TESTS")
[[ "${SKIP_BENCHES:-0}" == 1 ]] || run_benches $(grep -x 'bench-kernels' "$STAGE/BENCHES")
# The PyTorch side-by-side scripts (scripts/perf/gpu_<name>.py): each reads this run's
# $OUT/benches.log or selftest.md for our side and writes $OUT/<name>.md, which moves into a
# temporary folder (the device tool returns at most 8 files) and from there into gpu-check.md. They
# find the staged binaries through ILREC_STAGE (ilrec) and ILREC_BIN (tests, benches).
perf_names=()
run_perf() {
    local s n
    for s in scripts/perf/gpu_*.py; do
        [[ -e "$s" ]] || continue
        n=$(basename "$s" .py)
        n=${n#gpu_}
        perf_names+=("$n")
        ILREC_STAGE="$STAGE" ILREC_BIN="$BIN" PYTHONUNBUFFERED=1 run_step "perf-$n" "$OUT/perf.log" python3 "$s"
        mkdir -p "$work/perf"
        [[ -e "$OUT/$n.md" ]] && mv -f "$OUT/$n.md" "$work/perf/$n.md"
        report
    done
}
[[ "${SKIP_PERF:-0}" == 1 ]] || run_perf
[[ "${SKIP_TESTS:-0}" == 1 ]] || run_tests $(grep -vx 'test-cuda.*' "$STAGE/TESTS")
[[ "${SKIP_BENCHES:-0}" == 1 ]] || run_benches $(grep -vx 'bench-kernels' "$STAGE/BENCHES")

report
# The report last on stdout too: the device tool's reply carries the end of the output.
echo
cat "$OUT/gpu-check.md"
echo
say "== wrote $OUT/gpu-check.md ($(if ((${#failures[@]})); then echo "${#failures[@]} failed"; else echo "all passed"; fi))"
if ((${#failures[@]})); then
    printf 'FAILED: %s\n' "${failures[@]}" | tee -a "$LOG"
    exit 1
fi
RUN
}
write_run_sh >"$stage/run.sh"
chmod +x "$stage/run.sh"

# --- the size that travels: the stage (carried) plus the working tree the device tool sends
stage_bytes=$(du -sb "$stage" | cut -f1)
tree_bytes=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null | awk '{ s += $1 } END { print s + 0 }')
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
echo "staged: ${#tests[@]} test executables, ${#benches[@]} benches, ilrec; $(mib "$unpacked") stripped, $(mib "$stage_bytes") staged (bin.tar.xz $(mib "$(stat -c %s "$stage/bin.tar.xz")"))"
echo "with the working tree ($(mib "$tree_bytes")): $(mib $((stage_bytes + tree_bytes))) of the 64 MiB that may travel"
if ((stage_bytes + tree_bytes >= limit)); then
    die "gpu-stage/ plus the working tree is $(mib $((stage_bytes + tree_bytes))), over the 64 MiB a GPU run can carry; drop executables from $stage/ or ignore large untracked files"
fi

cat <<EOF

== on the GPU machine
device tool (this workplace):  run  command: "bash gpu-stage/run.sh"  carry: ["gpu-stage"]
    (\$OUT comes back: gpu-check.md, selftest.md, gpu-check.log, selftest.log, tests.log, benches.log,
     perf.log)
a GPU box over ssh (x86-64, glibc >= 2.34, NVIDIA driver >= 580; no Rust needed):
    git ls-files -z --cached --others --exclude-standard | tar --null -T - -czf /tmp/ilrec-tree.tgz && tar -czf /tmp/ilrec-stage.tgz gpu-stage
    scp /tmp/ilrec-tree.tgz /tmp/ilrec-stage.tgz GPUHOST: && ssh GPUHOST 'mkdir -p ilrec && cd ilrec && tar -xzf ../ilrec-tree.tgz && tar -xzf ../ilrec-stage.tgz && OUT=gpu-out bash gpu-stage/run.sh'
    scp -r GPUHOST:ilrec/gpu-out .
then: docs/gpu-check.md says how to commit the table under docs/perf/.
EOF
