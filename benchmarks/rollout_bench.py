"""Generated tokens/s: gold_jax JaxSampler vs transformers' generate (torch CPU), same weights.

    python benchmarks/rollout_bench.py          # hidden 256, 4 layers, vocab 8192, 8 prompts, 64 new tokens

One tiny random Llama made by transformers, saved with save_pretrained and
loaded by gold_jax (hf_io), so both engines run the same weights on the same
left-padded prompts. Greedy and sampled (T=0.9, top-p 0.95) decoding, rounds
alternating between the engines; the ratio of median tokens/s is the figure.
Greedy outputs are compared token by token as a sanity check.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import jax
import numpy as np

from gold_jax.models import hf_io
from gold_jax.rollout.jax_sampler import JaxSampler


def hf_model(args):
    import torch
    import transformers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
        max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=None)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    with torch.no_grad():  # a sharper head than N(0, 0.02): greedy ties would blur the check
        model.lm_head.weight.mul_(20.0)
    return model


def prompts(args):
    rng = np.random.default_rng(0)
    ids = rng.integers(2, args.vocab, (args.batch, args.prompt)).astype(np.int32)
    mask = np.ones_like(ids)
    for row in range(args.batch):  # lengths from prompt/2 to prompt, left-padded
        n_pad = int(rng.integers(0, args.prompt // 2 + 1))
        mask[row, :n_pad], ids[row, :n_pad] = 0, 0
    return ids, mask


def pick_torch_threads(fn, requested: int) -> int:
    """The torch thread count to compare against: `requested`, or (0) the faster of 1 and 2.

    On a shared, oversubscribed 2-core machine torch's 2-thread OpenMP barriers can
    make it several times slower than 1 thread; the baseline should get its best.
    """
    import torch
    if requested:
        torch.set_num_threads(requested)
        return requested
    best = None
    for n in (1, 2):
        torch.set_num_threads(n)
        fn()  # warm-up at this thread count
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        if best is None or dt < best[1]:
            best = (n, dt)
    torch.set_num_threads(best[0])
    return best[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv_heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--torch_threads", type=int, default=0, help="0: the faster of 1 and 2")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--preset", choices=("both", "model_bench", "demo"), default="both",
                    help="model_bench: the sizes above; demo: the demo's student (hidden 64, 2 layers, "
                         "vocab 512); both: one after the other in this run")
    args = ap.parse_args()
    import torch

    print(f"load {os.getloadavg()[0]:.2f} | jax {jax.__version__} {jax.devices()[0].device_kind} | "
          f"torch {torch.__version__}")
    if args.preset in ("both", "model_bench"):
        run(args)
    if args.preset in ("both", "demo"):
        run(argparse.Namespace(**{**vars(args), **DEMO}))


DEMO = dict(hidden=64, layers=2, heads=1, kv_heads=1, vocab=512)  # gold_jax/demo/build.py's student


def run(args) -> None:
    import torch
    hf = hf_model(args)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model = hf_io.load_pretrained(d)
    ids, mask = prompts(args)
    t_ids, t_mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
    r = args.new

    def hf_generate(sample: bool, seed: int = 0):
        torch.manual_seed(seed)
        kw = dict(do_sample=True, temperature=0.9, top_p=0.95, top_k=0) if sample else dict(do_sample=False)
        with torch.no_grad():
            out = hf.generate(input_ids=t_ids, attention_mask=t_mask, max_new_tokens=r, min_new_tokens=r,
                              pad_token_id=0, eos_token_id=None, **kw)
        return out[:, ids.shape[1]:].numpy()

    ref = hf_generate(False)
    threads = pick_torch_threads(lambda: hf_generate(False), args.torch_threads)
    print(f"torch threads for the comparison: {threads}")
    # EOS: an id that greedy decoding never emits, so both engines produce exactly R tokens.
    eos = int(np.setdiff1d(np.arange(2, args.vocab), ref)[0])
    sampler = JaxSampler(model, eos_id=eos, pad_id=0)

    def jax_generate(sample: bool, seed: int = 0):
        kw = dict(temperature=0.9, top_p=0.95) if sample else dict(temperature=0.0)
        res = sampler.generate(ids, mask, max_new_tokens=r, seed=seed, **kw)
        return res.completion_ids, int(res.completion_mask.sum())

    got, _ = jax_generate(False)
    jax_generate(True)  # compile both paths once (one executable: T, top-p are traced)
    agree = float((got == ref).mean())
    print(f"greedy agreement gold_jax vs transformers: {agree:.3f} of {ref.size} tokens")
    for sample in (False, True):
        jt, tt, n_tok = [], [], 0
        for i in range(args.rounds):
            t0 = time.perf_counter()
            _, n_tok = jax_generate(sample, seed=i)
            jt.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            hf_generate(sample, seed=i)
            tt.append(time.perf_counter() - t0)
        j_tps = n_tok / statistics.median(jt)
        t_tps = ids.shape[0] * r / statistics.median(tt)
        mode = "sampled T=0.9 top_p=0.95" if sample else "greedy"
        print(f"{mode:26s} gold_jax {j_tps:8.0f} tok/s   transformers {t_tps:7.0f} tok/s   "
              f"RATIO {j_tps / t_tps:.1f}x (target >= 5x)  load {os.getloadavg()[0]:.2f}")
    print(f"config hidden={args.hidden} layers={args.layers} vocab={args.vocab} batch={args.batch} "
          f"prompt<={args.prompt} new={r}; compiled shapes {sorted(sampler.compiled_shapes)}")


if __name__ == "__main__":
    main()
