#!/usr/bin/env python3
"""The naive PyTorch loss of LoRA training next to ours (kernels/loss.cu, kernels/probe.cu), on
the GPU machine: time and peak extra memory of

  - SFT: full logits (bf16 GEMM, f32 upcast) + F.cross_entropy, backward into the hidden rows;
  - ILRec: the same logits, the probes as a full-vocabulary logit lens per layer and on the
    candidate rows only, V_N / w / CPO / CRR / CPD in torch ops (ILREC.md), backward;

and, from `gpu-stage/ilrec selftest --device cuda` ($OUT/selftest.md when run.sh already ran it),
our fused rows at the selftest's shapes (the PyTorch side is also measured at those shapes).
Writes a markdown table to $OUT/loss.md (OUT defaults to gpu-out).

Usage on the GPU machine: python3 scripts/perf/gpu_loss.py
"""
import os
import re
import subprocess
import sys

import torch
import torch.nn.functional as F

OUT = os.environ.get("OUT", "gpu-out")
# (m response rows, hidden, vocab, candidates S, probed layers k)
SHAPES = [
    (130, 576, 49152, 1024, 4),  # the selftest's shape (ours is measured there)
    (4096, 576, 49152, 1024, 4),  # SmolLM2-135M, effective batch 256 x 16 response tokens
    (2048, 2048, 128256, 1024, 4),  # Llama-3.2-1B
    (4096, 4096, 128256, 1024, 4),  # Llama-3.1-8B (the paper's backbone)
]
ALPHA, BETA, LAMBDA, MU = 1.0, 0.1, 0.01, 0.005


def median_ms(fn, iters=10, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def peak_extra_mib(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def make(m, h, v, s, k, dev):
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(m, h, device=dev, generator=g).bfloat16().requires_grad_(True)
    w = (torch.randn(v, h, device=dev, generator=g) * (2.0 / h**0.5)).bfloat16()
    cand = torch.randperm(v, device=dev, generator=g)[:s]
    y = cand[torch.randint(0, s, (m,), device=dev, generator=g)]
    probes = [torch.randn(m, h, device=dev, generator=g).bfloat16().requires_grad_(True) for _ in range(k)]
    gamma = torch.ones(h, device=dev)
    rewards = torch.randn(m, s, device=dev, generator=g)
    return x, w, cand, y, probes, gamma, rewards


def sft(x, w, y, norm):
    logits = (x @ w.T).float()
    loss = F.cross_entropy(logits, y, reduction="sum") / norm
    loss.backward()


def ilrec(x, w, cand, y, probes, gamma, rewards, norm, full_lens):
    logits = (x @ w.T).float()
    jy = (cand[None, :] == y[:, None]).float().argmax(1)
    ws = w[cand]
    zs = []
    for p in probes:
        hn = F.rms_norm(p.float(), (p.shape[1],), gamma).bfloat16()
        z = (hn @ w.T).float()[:, cand] if full_lens else (hn @ ws.T).float()
        zs.append(z)
    zhat = torch.stack(zs).mean(0).detach()
    phat = zhat.softmax(-1)
    tau = ALPHA * phat.gather(1, jy[:, None])
    neg = (phat >= tau) & (torch.arange(cand.numel(), device=x.device)[None, :] != jy[:, None])
    wv = torch.where(neg, phat, torch.full_like(phat, -float("inf"))).softmax(-1).nan_to_num(0.0)
    mult = torch.ones_like(logits)
    mult[:, cand] = 1.0 + BETA * wv
    s_logits = logits * mult
    cpo = F.cross_entropy(s_logits, y, reduction="sum")
    h_mask = neg.clone()
    h_mask.scatter_(1, jy[:, None], True)
    q = torch.where(h_mask, rewards, torch.full_like(rewards, -float("inf"))).softmax(-1)
    logp = logits.log_softmax(-1)[:, cand]
    crr = -(q * torch.where(h_mask, logp, torch.zeros_like(logp))).sum()
    teacher = logits[:, cand].detach().softmax(-1)
    cpd = sum(F.kl_div(z.log_softmax(-1), teacher, reduction="sum") for z in zs)
    loss = (cpo + LAMBDA * cpd + MU * crr) / norm
    loss.backward()


def ours_from_selftest():
    """{label: (ms, rel err)} of our fused loss rows in the selftest table."""
    md = os.path.join(OUT, "selftest.md")
    if not os.path.exists(md) and os.path.exists("gpu-stage/ilrec"):
        subprocess.run(["gpu-stage/ilrec", "selftest", "--device", "cuda", "--out", md], check=False)
    rows = {}
    if not os.path.exists(md):
        return rows
    for line in open(md):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 6 and (cells[0].startswith("loss") or cells[0].startswith("probe")):
            rows[f"{cells[0]}: {cells[1]}"] = (cells[5], cells[2], cells[4])
    return rows


def main():
    if not torch.cuda.is_available():
        print("no CUDA device: nothing measured", file=sys.stderr)
        return 1
    dev = "cuda"
    name = torch.cuda.get_device_name()
    lines = [
        f"# Fused loss vs naive PyTorch ({name}, torch {torch.__version__})",
        "",
        "PyTorch side: bf16 GEMM into f32 logits `[m, V]`, F.cross_entropy / torch ops, backward into the",
        "hidden rows (head frozen). TFLOP/s counts the useful 4 m V h (forward logits + d hidden).",
        "",
        "| method | m | h | V | S | k | torch ms | torch TFLOP/s | torch peak extra MiB | m x V f32 MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, h, v, s, k in SHAPES:
        try:
            x, w, cand, y, probes, gamma, rewards = make(m, h, v, s, k, dev)
            norm = float(m)
            flop = 4.0 * m * v * h
            cases = [
                ("SFT", lambda: sft(x, w, y, norm)),
                ("ILRec (subset probes)", lambda: ilrec(x, w, cand, y, probes, gamma, rewards, norm, False)),
                ("ILRec (full-vocab probes)", lambda: ilrec(x, w, cand, y, probes, gamma, rewards, norm, True)),
            ]
            for label, fn in cases:
                ms = median_ms(fn)
                mib = peak_extra_mib(fn)
                lines.append(f"| {label} | {m} | {h} | {v} | {s} | {k} | {ms:.3f} | {flop / ms / 1e9:.1f} | {mib:.0f} | {m * v * 4 / 2**20:.0f} |")
            del x, w, probes
            torch.cuda.empty_cache()
        except torch.cuda.OutOfMemoryError as e:
            lines.append(f"| (out of memory) | {m} | {h} | {v} | {s} | {k} | - | - | - | {e} |")
            torch.cuda.empty_cache()
    ours = ours_from_selftest()
    lines += ["", "## Ours (ilrec selftest rows: the fused loss and probe at the selftest shapes)", ""]
    if ours:
        lines += ["| check | time (ms) | rel. error | result |", "|---|---|---|---|"]
        for key, (ms, err, res) in ours.items():
            lines.append(f"| {key} | {ms} | {err} | {res} |")
    else:
        lines.append("(no selftest table: run gpu-stage/run.sh or gpu-stage/ilrec selftest --device cuda first)")
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "loss.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
