"""The Python side of the `generation` bench: SmolLM2-135M-Instruct in PyTorch 2.15 +
`transformers` 5.24 on this machine's threads. Prefill of a 16-token prompt (one forward pass)
and HF `generate`, greedy, 64 new tokens with EOS ignored (`min_new_tokens`), at batch 1 and 8,
on the same ids as `crates/ember-models/benches/generation.rs`; then batch-1 `generate` again with
the weights rounded to bf16 and computed in f32 (a checkpoint published in bf16, as SmolLM2's
own is, loaded in f32), and as a bfloat16 model (`model.to(torch.bfloat16)`: PyTorch computes in
bf16). Prints one JSON line per case with the median seconds.

    python xtask/bench/generation_bench.py SHARED_DIR [--repeats N] [--smollm2 DIR]
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM

transformers.logging.set_verbosity_error()
PROMPT, NEW = 16, 64


def timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def prompts(batch):
    return torch.tensor([[(100 + 37 * (r + 1) * t) % 40000 for t in range(PROMPT)] for r in range(batch)])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shared", nargs="?")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--smollm2", default=os.environ.get(
        "EMBER_SMOLLM2", os.path.expanduser("~/.cache/ember/models/SmolLM2-135M-Instruct")))
    args = ap.parse_args()
    if not os.path.isfile(os.path.join(args.smollm2, "model.safetensors")):
        print(f"SKIP: no SmolLM2 at {args.smollm2}", file=sys.stderr)
        return
    model = AutoModelForCausalLM.from_pretrained(args.smollm2, dtype=torch.float32).eval()
    for batch in (1, 8):
        ids = prompts(batch)
        mask = torch.ones_like(ids)

        def prefill():
            with torch.no_grad():
                return model(input_ids=ids, attention_mask=mask).logits

        def gen():
            with torch.no_grad():
                return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW,
                                      do_sample=False, pad_token_id=model.config.eos_token_id)

        print(json.dumps({"bench": f"generation/smollm2_prefill_b{batch}_s{PROMPT}",
                          "median_s": timed(prefill, args.repeats), "items": batch * PROMPT}), flush=True)
        print(json.dumps({"bench": f"generation/smollm2_generate_b{batch}_p{PROMPT}_n{NEW}",
                          "median_s": timed(gen, args.repeats), "items": batch * NEW}), flush=True)
    # bf16 values in f32 tensors: round-to-nearest-even, as burn's cast on the Rust side.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    ids = prompts(1)
    mask = torch.ones_like(ids)

    def gen_b1():
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW,
                                  do_sample=False, pad_token_id=model.config.eos_token_id)

    print(json.dumps({"bench": f"generation/smollm2_bf16_weights_generate_b1_p{PROMPT}_n{NEW}",
                      "median_s": timed(gen_b1, args.repeats), "items": NEW}), flush=True)
    # A bfloat16 model (`dtype=torch.bfloat16`, or `.bfloat16()`): PyTorch computes in bf16.
    model = model.to(torch.bfloat16)
    print(json.dumps({"bench": f"generation/smollm2_bfloat16_generate_b1_p{PROMPT}_n{NEW}",
                      "median_s": timed(gen_b1, args.repeats), "items": NEW}), flush=True)


if __name__ == "__main__":
    main()
