"""Trie-constrained beam search, end to end, side by side on one GPU (issue 8,
docs/kernels/decode.md): HF transformers' `generate(num_beams=20, prefix_allowed_tokens_fn=...)`
against ours (`gpu-stage/ilrec decode-bench --device cuda`, the device decode loop of
engine/rec/beam_device.rs) on the same tiny random Llama (bf16 weights, SmolLM2's 49,152-token
vocabulary), the same synthetic semantic-ID items (1.7k, 10k, 100k: three codes of 256 + an end
token) and the same prompts, in the same run.

Writes a markdown table to $OUT/decode.md (OUT defaults to gpu-out). Needs torch + transformers
and a CUDA device; our side needs the staged binary (ILREC, default gpu-stage/ilrec) and is
reported as missing without it.

Recommendations/s counts users (one ranked top-10 list each) per second, prompt prefill included,
model upload and trie construction (once per item set) excluded on both sides. The two searches
are not the same algorithm (HF keeps finished hypotheses in a separate heap with its own stopping
rule), so the overlap of their top-10 lists is reported as context, not as a check: the check of
ours is `ilrec selftest --full` against the CPU reference.
"""
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

OUT = Path(os.environ.get("OUT", "gpu-out"))
ILREC = os.environ.get("ILREC", "gpu-stage/ilrec")
VOCAB = 49152
BEAM, TOP_K = 20, 10
USERS, USERS_PER_BATCH = 64, 16
ITEM_COUNTS = [1_700, 10_000, 100_000]
REPS = 3


def synthetic_items(rng: random.Random, n: int) -> list[list[int]]:
    """As `synthetic_semantic_items` in engine/rec/trie.rs (its own random draws)."""
    base = VOCAB - 3 * 256 - 1
    seen = set()
    while len(seen) < n:
        a = rng.randrange(16) if rng.randrange(2) == 0 else rng.randrange(256)
        seen.add((base + a, base + 256 + rng.randrange(256), base + 512 + rng.randrange(256), VOCAB - 1))
    return [list(s) for s in sorted(seen)]


def build_trie(items):
    """node id -> {token: child id}; node 0 is the root."""
    kids = [{}]
    for seq in items:
        node = 0
        for t in seq:
            nxt = kids[node].get(t)
            if nxt is None:
                nxt = len(kids)
                kids[node][t] = nxt
                kids.append({})
            node = nxt
    return kids, [list(k.keys()) for k in kids]


def hf_side(model, items, prompts):
    kids, allowed = build_trie(items)

    def run_batch(batch):
        width = max(len(p) for p in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for i, p in enumerate(batch):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1

        def prefix_allowed(_batch_id, input_ids):
            node = 0
            for t in input_ids[width:].tolist():
                node = kids[node].get(t)
                if node is None:
                    return [VOCAB - 1]
            return allowed[node] or [VOCAB - 1]

        out = model.generate(
            input_ids=ids.cuda(), attention_mask=mask.cuda(), num_beams=BEAM, num_return_sequences=TOP_K,
            max_new_tokens=4, prefix_allowed_tokens_fn=prefix_allowed, eos_token_id=VOCAB - 1, pad_token_id=0,
            length_penalty=0.0, early_stopping=True, do_sample=False, output_scores=False,
        )
        return out[:, width:].tolist()

    def run_all():
        seqs = []
        for i in range(0, len(prompts), USERS_PER_BATCH):
            seqs.extend(run_batch(prompts[i:i + USERS_PER_BATCH]))
        torch.cuda.synchronize()
        return seqs

    index = {tuple(s): i for i, s in enumerate(items)}
    seqs = run_all()
    times = []
    for _ in range(REPS):
        t0 = time.perf_counter()
        run_all()
        times.append(time.perf_counter() - t0)
    lists = []
    for u in range(len(prompts)):
        lists.append([index.get(tuple(s[:4])) for s in seqs[u * TOP_K:(u + 1) * TOP_K]])
    return statistics.median(times), lists


def our_side(model_dir, items, prompts, tmp):
    if not Path(ILREC).exists():
        return None, None, f"{ILREC} not found"
    inp = Path(tmp) / "decode_input.json"
    inp.write_text(json.dumps({"items": items, "prompts": prompts}))
    cmd = [ILREC, "decode-bench", "--model", str(model_dir), "--input", str(inp), "--device", "cuda",
           "--weights", "bf16", "--beam", str(BEAM), "--top-k", str(TOP_K), "--max-rows", str(USERS_PER_BATCH * BEAM),
           "--reps", str(REPS)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return None, None, (r.stderr.strip().splitlines() or ["failed"])[-1]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return out["seconds"], out["results"], None


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    rng = random.Random(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                      rms_norm_eps=1e-5, tie_word_embeddings=True, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    rows = [f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}; tiny Llama (hidden 256, 4 blocks, vocab {VOCAB}), "
            f"bf16 weights; {USERS} users (prompts of 20-40 tokens) in batches of {USERS_PER_BATCH}; beam {BEAM}, top {TOP_K}; "
            f"median of {REPS} runs after a warm-up.", "",
            "| items | HF generate (recs/s) | ours, --device cuda (recs/s) | speed-up | top-10 overlap | note |",
            "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "tiny-llama-49k"
        model.save_pretrained(model_dir, safe_serialization=True)
        (model_dir / "generation_config.json").unlink(missing_ok=True)
        hf = model.to(device="cuda", dtype=torch.bfloat16)
        prompts = [[rng.randrange(1, VOCAB - 800) for _ in range(rng.randrange(20, 41))] for _ in range(USERS)]
        for n in ITEM_COUNTS:
            items = synthetic_items(rng, n)
            with torch.no_grad():
                hf_s, hf_lists = hf_side(hf, items, prompts)
            our_s, our_lists, note = our_side(model_dir, items, prompts, tmp)
            hf_rate = USERS / hf_s
            if our_s is None:
                rows.append(f"| {n} | {hf_rate:.1f} | - | - | - | ours: {note} |")
            else:
                overlap = statistics.mean(len(set(a) & set(b)) / TOP_K for a, b in zip(hf_lists, our_lists))
                our_rate = USERS / our_s
                rows.append(f"| {n} | {hf_rate:.1f} | {our_rate:.1f} | {our_rate / hf_rate:.1f}x | {overlap:.2f} | target >= 20x |")
            print(rows[-1], flush=True)
    text = "\n".join(rows) + "\n"
    (OUT / "decode.md").write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
