"""The Python side of `cargo xtask bench`'s `cli` row: what `ember generate` does, done the way a
`transformers` user does it. Each run is a fresh Python process that loads SmolLM2 in float32,
tokenizes the prompt, and runs greedy `generate` with a `TextStreamer` printing to stdout (read
from a pipe), for exactly N new tokens (`min_new_tokens`). Runs alternate between a short and a
long N; the difference of their median wall times is the decoding loop alone (interpreter start,
imports, loading and prefill cancel). Prints one JSON line: `{"bench", "median_s", "items"}`.

    python xtask/bench/cli_generate_bench.py --smollm2 DIR --prompt TEXT [--short 16]
        [--long 144] [--repeats 3]
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

# One run: the child process. Kept as a string so that each run pays the same start-up as a
# user's script would, and nothing is cached between runs.
CHILD = r"""
import sys, torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer
transformers.logging.set_verbosity_error()
model_dir, n = sys.argv[1], int(sys.argv[2])
prompt = sys.stdin.read()
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
ids = tok(prompt, return_tensors="pt")
with torch.no_grad():
    model.generate(**ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                   pad_token_id=tok.eos_token_id, streamer=TextStreamer(tok, skip_prompt=True))
"""


def run(model_dir, prompt, n):
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, model_dir, str(n)], input=prompt.encode(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        sys.exit(f"generate with {n} new tokens failed: {out.stderr.decode(errors='replace')}")
    if not out.stdout.strip():
        sys.exit(f"generate with {n} new tokens printed no text")
    return seconds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smollm2", required=True)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--short", type=int, default=16)
    ap.add_argument("--long", type=int, default=144)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    times = {args.short: [], args.long: []}
    for _ in range(args.repeats):
        for n in (args.short, args.long):
            times[n].append(run(args.smollm2, args.prompt, n))
    tokens = args.long - args.short
    seconds = statistics.median(times[args.long]) - statistics.median(times[args.short])
    print(json.dumps({"bench": f"cli/smollm2_generate_b1_n{tokens}", "median_s": seconds,
                      "items": tokens}), flush=True)


if __name__ == "__main__":
    main()
