#!/usr/bin/env python3
"""LoRA linear fwd+bwd on the GPU: PyTorch side of the comparison in docs/kernels/lora.md.

Times, at the shapes of the `cuda_lora_FLOP` criterion group (bench/kernels.rs), with CUDA events
after warm-up (median of 20):
  - the bare base GEMMs: y = x W^T and dx = dy W (cuBLAS, bf16, W frozen): the target's denominator;
  - PEFT-style unfused LoRA: a frozen bf16 nn.Linear plus lora_A / lora_B (bf16), y = base(x) +
    s * B(A(drop(x))), autograd backward w.r.t. x, A and B (what peft.LoraLayer does), with and
    without dropout 0.05;
  - peft's own LoraLayer on the same shapes when peft imports.
Our side: the `cuda_lora_FLOP/...` medians parsed from the criterion log of the same run
($OUT/benches.log, written by gpu-stage/run.sh) when it is there.

Writes $OUT/lora.md (OUT defaults to gpu-out). Needs torch with CUDA; no network, no Rust.
"""
import os
import re
import statistics
import sys

OUT = os.environ.get("OUT", "gpu-out")
SHAPES = [("smollm2 q", 8192, 576, 576), ("smollm2 gate", 8192, 576, 1536), ("4096 q", 8192, 4096, 4096)]
RANKS = [16, 64]


def timed(fn, reps=20, warm=5):
    import torch

    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def ours_from_log():
    """{bench id: median ms} for the cuda_lora_FLOP group in the criterion log, if present."""
    path = os.path.join(OUT, "benches.log")
    if not os.path.exists(path):
        return {}
    unit = {"ns": 1e-6, "µs": 1e-3, "us": 1e-3, "ms": 1.0, "s": 1e3}
    res, cur = {}, None
    for line in open(path, encoding="utf-8", errors="replace"):
        m = re.match(r"^(cuda_lora_FLOP/.+?)(\s+time:.*)?$", line.rstrip())
        if m:
            cur = m.group(1).strip()
            line = m.group(2) or ""
        t = re.search(r"time:\s*\[\S+ \S+ (\S+) (\S+)", line)
        if cur and t:
            res[cur.split("/", 1)[1]] = float(t.group(1)) * unit.get(t.group(2), float("nan"))
            cur = None
    return res


def main():
    try:
        import torch
    except ImportError:
        print("gpu_lora.py: torch is not installed", file=sys.stderr)
        return 1
    if not torch.cuda.is_available():
        print("gpu_lora.py: no CUDA device", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    dev = torch.device("cuda")
    bf = torch.bfloat16
    ours = ours_from_log()
    rows = []
    for name, m, k, n in SHAPES:
        x = torch.randn(m, k, device=dev, dtype=bf)
        w = torch.randn(n, k, device=dev, dtype=bf) * 0.05
        dy = torch.randn(m, n, device=dev, dtype=bf)
        flop = 4 * m * n * k

        def bare():
            torch.matmul(x, w.t())
            torch.matmul(dy, w)

        t_bare = timed(bare)
        rows.append((name, m, k, n, "-", "bare base fwd+bwd (torch.matmul)", t_bare, flop))
        for r in RANKS:
            for p in (0.0, 0.05):
                base = torch.nn.Linear(k, n, bias=False, device=dev, dtype=bf)
                base.weight.requires_grad_(False)
                la = torch.nn.Linear(k, r, bias=False, device=dev, dtype=bf)
                lb = torch.nn.Linear(r, n, bias=False, device=dev, dtype=bf)
                torch.nn.init.normal_(lb.weight, std=0.05)
                drop = torch.nn.Dropout(p)
                s = 2.0
                xg = x.clone().requires_grad_(True)

                def unfused():
                    y = base(xg) + s * lb(la(drop(xg)))
                    y.backward(dy)

                t = timed(unfused)
                rows.append((name, m, k, n, r, f"unfused LoRA fwd+bwd, dropout {p} (nn.Linear x3, autograd)", t, flop))
            try:
                import peft  # noqa: F401
                from peft.tuners.lora import Linear as PeftLinear

                base = torch.nn.Linear(k, n, bias=False, device=dev, dtype=bf)
                layer = PeftLinear(base, "default", r=r, lora_alpha=2 * r, lora_dropout=0.05).to(dev, bf)
                layer.base_layer.weight.requires_grad_(False)
                xg = x.clone().requires_grad_(True)

                def peft_step():
                    layer(xg).backward(dy)

                t = timed(peft_step)
                rows.append((name, m, k, n, r, "peft LoraLayer fwd+bwd, dropout 0.05", t, flop))
            except Exception as e:  # peft missing or its API moved: the plain chain above stands in
                rows.append((name, m, k, n, r, f"peft LoraLayer: skipped ({type(e).__name__})", float("nan"), flop))
    os.makedirs(OUT, exist_ok=True)
    lines = [
        "# LoRA linear fwd+bwd: PyTorch vs ours (same machine, same run)",
        "",
        f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}. Times: median ms (CUDA events, 20 reps"
        " after 5 warm-up). 'vs bare' = time / the bare base fwd+bwd of the same shape (issue target: <= 1.05"
        " for ours). TFLOP/s counts only the base GEMMs' 4*M*N*K.",
        "",
        "| shape | M x K -> N | r | variant | ms | vs bare | base TFLOP/s |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    bare_ms = {}
    for name, m, k, n, r, what, t, flop in rows:
        if r == "-":
            bare_ms[name] = t
        rel = t / bare_ms[name] if bare_ms.get(name) else float("nan")
        lines.append(f"| {name} | {m}x{k}->{n} | {r} | {what} | {t:.3f} | {rel:.2f} | {flop / t / 1e9:.0f} |")
    lines += ["", "## Ours (criterion `cuda_lora_FLOP`, same run)", ""]
    if ours:
        lines += ["| bench | ms | vs torch bare |", "|---|---:|---:|"]
        for bid, ms in ours.items():
            shape = next((s[0] for s in SHAPES if bid.startswith(s[0] + " ")), None)
            rel = ms / bare_ms[shape] if shape in bare_ms else float("nan")
            lines.append(f"| {bid} | {ms:.3f} | {rel:.2f} |")
    else:
        lines.append(f"(no cuda_lora_FLOP lines in {os.path.join(OUT, 'benches.log')}: run the kernels bench first)")
    with open(os.path.join(OUT, "lora.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
