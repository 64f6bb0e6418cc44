"""Side-by-side CPU reference numbers for docs/perf/cpu.md: PyTorch + HF transformers on the same
machine and model as `cargo bench --bench forward` (SmolLM2-135M imported to weights/smollm2-135m,
f32). Run with the fixture venv: .venv-ref/bin/python scripts/perf/torch_cpu_reference.py
"""
import sys, time, statistics
import torch
from transformers import AutoModelForCausalLM

torch.manual_seed(0)
model_dir = sys.argv[1] if len(sys.argv) > 1 else "weights/smollm2-135m"
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
vocab = model.config.vocab_size
print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")


def tokens(b, t):
    ids = (torch.arange(b * t) * 7919 + 13) % vocab
    return ids.view(b, t)


def timed(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        s = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - s)
    return statistics.median(ts)


with torch.inference_mode():
    for b, t in [(8, 128), (1, 512)]:
        ids = tokens(b, t)
        s = timed(lambda: model(input_ids=ids, use_cache=False).logits, 5)
        print(f"prefill {b}x{t}: {s * 1e3:.1f} ms, {b * t / s:.1f} tok/s")
    # Decode: one new token after a 64-token prompt, with the KV cache.
    ids = tokens(1, 64)
    out = model(input_ids=ids, use_cache=True)
    past = out.past_key_values
    step = torch.tensor([[7]])

    def one():
        model(input_ids=step, past_key_values=past, use_cache=True)
        past.crop(-1)  # back to the 64-token prompt for the next repetition

    s = timed(one, 20)
    print(f"decode step at 64: {s * 1e3:.2f} ms, {1 / s:.1f} tok/s")
