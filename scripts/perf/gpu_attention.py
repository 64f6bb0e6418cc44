#!/usr/bin/env python3
"""Fused attention side by side with torch SDPA on the GPU machine (issue 6; docs/kernels/attention.md).

Shapes: B*S = 16k tokens, S in {512, 1k, 2k, 4k, 8k}, head dim 64 (32 heads) and 128 (16 heads),
causal, bf16, forward and backward. torch: scaled_dot_product_attention with the flash and the cuDNN
backends, timed with CUDA events after warm-up (median of 10), on random (never zero) inputs. FLOPs:
forward 4*B*S^2*H*D / 2 (causal), backward 2.5x that.

Ours: the criterion rows `flash_attention/{fwd,bwd} s{S} b{B} h{H} d{D}` of the staged kernels bench
(bench/kernels.rs `flash_attention`, which syncs after every launch, so it includes launch
overhead). They are read from $OUT/benches.log when gpu-stage/run.sh has run the benches already;
otherwise the bench executable is taken from $ILREC_KERNELS_BENCH or unpacked from
gpu-stage/bin.tar.xz and run with `--bench flash_attention`.

Correctness here is torch's own: its flash and cuDNN outputs and gradients against SDPA's math
backend in f32 on the first sequence of each shape (up to S = 4096), as the error scale bf16
kernels have on these inputs. Ours is checked against the CPU f32 reference by
`ilrec selftest --device cuda` (same inputs style, relative error <= 1e-2).

Writes $OUT/attention.md (OUT defaults to gpu-out). Needs torch with CUDA; no network.
"""
import lzma
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile

OUT = os.environ.get("OUT", "gpu-out")
SEQS = [512, 1024, 2048, 4096, 8192]
DIMS = [64, 128]
TOKENS = 16384
HIDDEN = 2048


def flops(b, s, h, d):
    fwd = 4 * b * s * s * h * d / 2
    return fwd, 2.5 * fwd


# ------------------------------------------------------------------ ours (criterion output)

UNITS = {"ps": 1e-9, "ns": 1e-6, "µs": 1e-3, "us": 1e-3, "ms": 1.0, "s": 1e3}


def parse_criterion(text):
    """{bench id: median ms} from criterion's console output."""
    rows, name = {}, None
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            name = re.sub(r"\s+time:.*", "", line).strip()
        m = re.search(r"time:\s*\[\s*\S+\s+\S+\s+(\S+)\s+(\S+)", line)
        if m and name and "change" not in line:
            value, unit = float(m.group(1)), m.group(2)
            if unit in UNITS:
                rows[name] = value * UNITS[unit]
    return rows


def bench_executable(tmp):
    exe = os.environ.get("ILREC_KERNELS_BENCH")
    if exe and os.path.exists(exe):
        return exe
    archive = os.path.join("gpu-stage", "bin.tar.xz")
    if not os.path.exists(archive):
        return None
    with lzma.open(archive) as xz, tarfile.open(fileobj=xz) as tar:
        for member in tar.getmembers():
            if os.path.basename(member.name) == "bench-kernels":
                member.name = "bench-kernels"
                tar.extract(member, tmp)
                path = os.path.join(tmp, "bench-kernels")
                os.chmod(path, 0o755)
                return path
    return None


def ours():
    log = os.path.join(OUT, "benches.log")
    if os.path.exists(log):
        rows = {k: v for k, v in parse_criterion(open(log, errors="replace").read()).items() if k.startswith("flash_attention/")}
        if rows:
            return rows, f"criterion rows in {log}"
    with tempfile.TemporaryDirectory() as tmp:
        exe = bench_executable(tmp)
        if exe is None:
            return {}, "no bench executable (set ILREC_KERNELS_BENCH or run scripts/gpu-check.sh first)"
        env = dict(os.environ, CRITERION_HOME=os.path.join(tmp, "criterion"))
        cmd = [exe, "--bench", "flash_attention", "--warm-up-time", "1", "--measurement-time", "3"]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
        except (OSError, subprocess.TimeoutExpired) as e:
            return {}, f"running {exe}: {e}"
        rows = {k: v for k, v in parse_criterion(p.stdout).items() if k.startswith("flash_attention/")}
        note = f"`{os.path.basename(exe)} --bench flash_attention` (exit {p.returncode})"
        if not rows:
            note += ": no rows; last output: " + " / ".join((p.stdout + p.stderr).strip().splitlines()[-3:])
        return rows, note


# ------------------------------------------------------------------ torch

def torch_side(torch):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    backends = [("flash", SDPBackend.FLASH_ATTENTION), ("cuDNN", SDPBackend.CUDNN_ATTENTION)]

    def timed(fn, reps=10, warm=3):
        for _ in range(warm):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        return statistics.median(times)

    def rel(x, ref):
        return ((x.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()

    results = {}
    gen = torch.Generator(device="cuda").manual_seed(0)
    for d in DIMS:
        h = HIDDEN // d
        for s in SEQS:
            b = TOKENS // s
            shape = (b, h, s, d)
            q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_() for _ in range(3))
            dout = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen)
            ref = None
            if s <= 4096:
                q1, k1, v1 = (t[:1].detach().float().requires_grad_() for t in (q, k, v))
                with sdpa_kernel(SDPBackend.MATH):
                    o1 = F.scaled_dot_product_attention(q1, k1, v1, is_causal=True)
                g1 = torch.autograd.grad(o1, (q1, k1, v1), dout[:1].float())
                ref = (o1.detach(), g1)
            for name, backend in backends:
                row = {}
                try:
                    with sdpa_kernel(backend):
                        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                        row["fwd_ms"] = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
                        row["bwd_ms"] = timed(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True))
                        if ref is not None:
                            qs, ks, vs = (t[:1].detach().clone().requires_grad_() for t in (q, k, v))
                            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
                            g = torch.autograd.grad(o, (qs, ks, vs), dout[:1])
                            row["err"] = max([rel(o, ref[0])] + [rel(a, r) for a, r in zip(g, ref[1])])
                except RuntimeError as e:
                    row["error"] = str(e).splitlines()[0][:80]
                results[(s, d, name)] = row
            del q, k, v, dout, ref
            torch.cuda.empty_cache()
    return results


def main():
    os.makedirs(OUT, exist_ok=True)
    lines = ["# Fused attention vs torch SDPA", ""]
    try:
        import torch
    except ImportError as e:
        torch = None
        lines += [f"torch unavailable: {e}", ""]
    if torch is not None and not torch.cuda.is_available():
        lines += ["torch sees no CUDA device.", ""]
        torch = None
    mine, how = ours()
    lines += [f"- ours: {how}"]
    tr = {}
    if torch is not None:
        lines += [f"- GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}"]
        tr = torch_side(torch)
    lines += [
        "- TFLOP/s: forward 4*B*S^2*H*D/2 (causal), backward 2.5x; median ms (ours: criterion median, with a sync per launch)",
        "- err: torch's max relative L2 error (out, dq, dk, dv) against SDPA math in f32 on the first sequence (S <= 4096)",
        "",
        "| pass | S | B | H | D | ours ms | ours TFLOP/s | flash ms | flash TFLOP/s | flash err | cuDNN ms | cuDNN TFLOP/s | cuDNN err | ours / flash | ours / cuDNN |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(x, spec=".3f"):
        return "-" if x is None else format(x, spec)

    for d in DIMS:
        h = HIDDEN // d
        for s in SEQS:
            b = TOKENS // s
            fl = dict(zip(("fwd", "bwd"), flops(b, s, h, d)))
            for p in ("fwd", "bwd"):
                ms = mine.get(f"flash_attention/{p} s{s} b{b} h{h} d{d}")
                cells = [p, str(s), str(b), str(h), str(d), fmt(ms), fmt(ms and fl[p] / ms / 1e9, ".1f")]
                ratios = []
                for name in ("flash", "cuDNN"):
                    row = tr.get((s, d, name), {})
                    t = row.get(f"{p}_ms")
                    cells += [fmt(t) if "error" not in row else row["error"], fmt(t and fl[p] / t / 1e9, ".1f"), fmt(row.get("err"), ".1e")]
                    ratios.append(fmt(t / ms, ".2f") if (t and ms) else "-")
                lines.append("| " + " | ".join(cells + ratios) + " |")
    lines += ["", "ours / torch > 1 means ours is faster.", ""]
    decode = sorted(k for k in mine if k.startswith("flash_attention/decode"))
    if decode:
        lines += ["Decoding (ours): " + "; ".join(f"{k.split('/', 1)[1]}: {mine[k]:.4f} ms" for k in decode), ""]
    path = os.path.join(OUT, "attention.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
