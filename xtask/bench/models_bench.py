"""The Python side of the `encoders` bench: the same random-weight shapes in PyTorch 2.15 +
`transformers` 5.24 (default attention implementation, SDPA), on this machine's threads.
Prints one JSON line per case with the median seconds.

    python xtask/bench/models_bench.py SHARED_DIR [--repeats N]
"""

import argparse
import json
import statistics
import time

import torch
import transformers
from transformers import BertConfig, BertForSequenceClassification, BertModel

transformers.logging.set_verbosity_error()


def timed(fn, repeats, warm_up=True):
    if warm_up:
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def has_bf16_dot_products():
    """Whether the CPU exposes AVX512_BF16: without it PyTorch's bf16 autocast step takes minutes
    (259 s against 5.5 s in f32 on an AVX2-only machine here), so it is timed once, cold."""
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512_bf16" in f.read()
    except OSError:
        return True


def config(vocab, hidden, layers, heads, intermediate):
    return BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=intermediate)


def forward_case(name, cfg, batch, repeats, bf16=False):
    torch.manual_seed(0)
    model = BertModel(cfg).eval()
    if bf16:
        model = model.bfloat16()
    ids = torch.randint(0, cfg.vocab_size, (batch, 128))
    mask = torch.ones(batch, 128, dtype=torch.int64)

    def run():
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).last_hidden_state

    print(json.dumps({"bench": f"encoders/{name}", "median_s": timed(run, repeats), "items": batch}), flush=True)


def train_case(repeats, bf16=False):
    torch.manual_seed(0)
    cfg = config(21128, 768, 3, 12, 3072)
    model = BertForSequenceClassification(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, eps=1e-8, weight_decay=0.01)
    ids = torch.randint(0, cfg.vocab_size, (32, 128))
    mask = torch.ones(32, 128, dtype=torch.int64)
    labels = torch.randint(0, 2, (32,))

    def step():
        # HF's Trainer with bf16=True: the forward pass under CPU autocast.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()

    name = "encoders/rbt3_train_step_bf16_b32_s128" if bf16 else "encoders/rbt3_train_step_b32_s128"
    slow = bf16 and not has_bf16_dot_products()
    seconds = timed(step, 1, warm_up=False) if slow else timed(step, repeats)
    print(json.dumps({"bench": name, "median_s": seconds, "items": 32}), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shared")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    forward_case("bert_base_forward_b8_s128", config(30522, 768, 12, 12, 3072), 8, a.repeats)
    forward_case("bert_base_forward_bf16_b8_s128", config(30522, 768, 12, 12, 3072), 8, a.repeats, bf16=True)
    forward_case("minilm_l6_forward_b32_s128", config(30522, 384, 6, 12, 1536), 32, a.repeats)
    train_case(a.repeats)
    train_case(a.repeats, bf16=True)


if __name__ == "__main__":
    main()
