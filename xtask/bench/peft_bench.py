"""The Python side of the `peft` bench: LoRA training steps with `peft` 0.21 + PyTorch 2.15 +
`transformers` 5.24 on this machine's threads, the same shapes as
`crates/ember-models/benches/peft.rs`. Prints one JSON line per case with the median seconds.

- `peft/lora_rbt3_train_step_b32_s128`: a 3-layer, hidden-768, vocab-21,128
  `BertForSequenceClassification` (random weights, dropout on), LoRA r 8, alpha 16 on
  `query` / `value`, `task_type="SEQ_CLS"` (the classifier is a trained copy), AdamW over the
  trainable parameters, batch 32, seq 128.
- `peft/lora_smollm2_train_step_b8_s256`: SmolLM2-135M-Instruct in f32, LoRA r 8, alpha 16 on
  `q_proj` / `v_proj`, `task_type="CAUSAL_LM"`, AdamW, batch 8, seq 256, labels = the ids.
- `peft/{prompt,prefix}_smollm2_train_step_b8_s256`: the same step with
  `PromptTuningConfig(num_virtual_tokens=20)` (RANDOM init) or
  `PrefixTuningConfig(num_virtual_tokens=20)` (no projection) in place of the LoRA.

    python xtask/bench/peft_bench.py SHARED_DIR [--repeats N] [--smollm2 DIR]
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch
import transformers
from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM, BertConfig, BertForSequenceClassification

transformers.logging.set_verbosity_error()


def timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_fn(model, lr, batch):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, eps=1e-8,
                            weight_decay=0.01)

    def step():
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()

    return step


def rbt3_lora_model():
    """The LoRA'd rbt3-shaped classifier (also what `memory_bench.py --lora` trains)."""
    cfg = BertConfig(vocab_size=21128, hidden_size=768, num_hidden_layers=3, num_attention_heads=12,
                     intermediate_size=3072)
    model = BertForSequenceClassification(cfg)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS")
    return get_peft_model(model, config).train()


def rbt3_case(repeats):
    torch.manual_seed(0)
    model = rbt3_lora_model()
    batch = {
        "input_ids": torch.randint(0, 21128, (32, 128)),
        "attention_mask": torch.ones(32, 128, dtype=torch.int64),
        "labels": torch.randint(0, 2, (32,)),
    }
    print(json.dumps({"bench": "peft/lora_rbt3_train_step_b32_s128",
                      "median_s": timed(step_fn(model, 2e-5, batch), repeats), "items": 32}), flush=True)


def smollm2_adapters():
    """The SmolLM2 rows: (bench name, peft config)."""
    return [
        ("peft/lora_smollm2_train_step_b8_s256",
         LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")),
        ("peft/prompt_smollm2_train_step_b8_s256",
         PromptTuningConfig(num_virtual_tokens=20, task_type="CAUSAL_LM")),
        ("peft/prefix_smollm2_train_step_b8_s256",
         PrefixTuningConfig(num_virtual_tokens=20, task_type="CAUSAL_LM")),
    ]


def smollm2_batch(batch_size=8, seq=256):
    """The same ids as the Rust bench: (100 + 37·(row + 1)·t + 11·t²) mod 40,000; labels = ids."""
    ids = torch.tensor([[(100 + 37 * (r + 1) * t + 11 * t * t) % 40000 for t in range(seq)]
                        for r in range(batch_size)])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def smollm2_case(path, repeats):
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        print(f"SKIP: no SmolLM2 at {path}", file=sys.stderr)
        return
    batch = smollm2_batch()
    for name, config in smollm2_adapters():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model = get_peft_model(model, config).train()
        print(json.dumps({"bench": name, "median_s": timed(step_fn(model, 2e-4, batch), repeats),
                          "items": batch["input_ids"].shape[0]}), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shared", nargs="?")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--smollm2", default=os.environ.get(
        "EMBER_SMOLLM2", os.path.expanduser("~/.cache/ember/models/SmolLM2-135M-Instruct")))
    ap.add_argument("--only", choices=["rbt3", "smollm2"])
    a = ap.parse_args()
    if a.only in (None, "rbt3"):
        rbt3_case(a.repeats)
    if a.only in (None, "smollm2"):
        smollm2_case(a.smollm2, a.repeats)


if __name__ == "__main__":
    main()
