"""The Python side of the peak-memory row: three training steps of the
`encoders/rbt3_train_step_b32_s128` workload (a 3-layer, hidden-768, vocab-21,128
`BertForSequenceClassification`, batch 32, seq 128, AdamW) in PyTorch 2.15 + `transformers`
5.24, then the process's peak resident set (`VmHWM`) as one JSON line. The Rust side is
`cargo run --release -p ember-models --example train_step_memory`.

With `--lora`, the model is wrapped by `peft` 0.21 first (LoRA r 8, alpha 16 on `query` /
`value`, `task_type="SEQ_CLS"`: the `peft/lora_rbt3_train_step_b32_s128` workload) and AdamW
gets the trainable parameters only; the row is `memory/lora_rbt3_train_step_b32_s128` (Rust:
`... --example train_step_memory -- --lora`).

With `--prompt-tuning` or `--prefix-tuning`, three steps of the
`peft/{prompt,prefix}_smollm2_train_step_b8_s256` rows instead (SmolLM2-135M-Instruct in f32 with
`PromptTuningConfig(num_virtual_tokens=20)` or `PrefixTuningConfig(num_virtual_tokens=20)`,
batch 8, seq 256; skipped, saying so, without SmolLM2): rows
`memory/{prompt,prefix}_smollm2_train_step_b8_s256`.

With `--generate`, the `quant/smollm2_*_generate_b1_p16_n64` workload instead: SmolLM2 loaded
in float32, in bfloat16 with `--bf16` (`dtype=torch.bfloat16`), or, with `--nf4` / `--int8`, through bitsandbytes 0.50 (`BitsAndBytesConfig(
load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
bnb_4bit_compute_dtype=torch.float32)` / `load_in_8bit=True`, `eval()`), then 64 greedy new
tokens after the 16-token bench prompt; rows `memory/generate_{f32,bf16,nf4,int8}_smollm2_b1_p16_n64`
(Rust: `... --example generate_memory [-- --bf16 | --nf4 | --int8]`).

    python xtask/bench/memory_bench.py SHARED_DIR [--lora | --prompt-tuning | --prefix-tuning]
    python xtask/bench/memory_bench.py SHARED_DIR --generate [--bf16 | --nf4 | --int8]
"""

import json
import os
import sys

import torch
import transformers
from transformers import BertConfig, BertForSequenceClassification

transformers.logging.set_verbosity_error()


def peak_rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def smollm2_prompt_learning(prefix):
    """Three prompt- or prefix-tuning steps of SmolLM2; the row's name, or None without it."""
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = os.environ.get("EMBER_SMOLLM2",
                          os.path.expanduser("~/.cache/ember/models/SmolLM2-135M-Instruct"))
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        print(f"SKIP: no SmolLM2 at {path}", file=sys.stderr)
        return None
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = (PrefixTuningConfig if prefix else PromptTuningConfig)(num_virtual_tokens=20,
                                                                    task_type="CAUSAL_LM")
    model = get_peft_model(model, config).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, eps=1e-8,
                            weight_decay=0.01)
    # The ids of the bench rows: (100 + 37·(row + 1)·t + 11·t²) mod 40,000.
    ids = torch.tensor([[(100 + 37 * (r + 1) * t + 11 * t * t) % 40000 for t in range(256)]
                        for r in range(8)])
    for _ in range(3):
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    kind = "prefix" if prefix else "prompt"
    return f"memory/{kind}_smollm2_train_step_b8_s256"


def smollm2_generate(kind):
    """64 greedy tokens of SmolLM2 in f32 / bf16 / NF4 / int8; the row's name, or None without it."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = os.environ.get("EMBER_SMOLLM2",
                          os.path.expanduser("~/.cache/ember/models/SmolLM2-135M-Instruct"))
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        print(f"SKIP: no SmolLM2 at {path}", file=sys.stderr)
        return None
    quantization = {
        "f32": None,
        "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32),
        "int8": BitsAndBytesConfig(load_in_8bit=True),
        "bf16": None,
    }[kind]
    kwargs = {} if quantization is None else {"quantization_config": quantization}
    dtype = torch.bfloat16 if kind == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="cpu",
                                                 **kwargs).eval()
    # The bench rows' prompt: ids 100 + 37·t modulo 40,000; EOS ignored (min_new_tokens).
    ids = torch.tensor([[(100 + 37 * t) % 40000 for t in range(16)]])
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, min_new_tokens=64,
                       do_sample=False, pad_token_id=model.config.eos_token_id)
    return f"memory/generate_{kind}_smollm2_b1_p16_n64"


def main():
    if "--generate" in sys.argv[1:]:
        kind = next((k for k in ("nf4", "int8", "bf16") if f"--{k}" in sys.argv[1:]), "f32")
        name = smollm2_generate(kind)
        if name:
            print(json.dumps({"bench": name, "peak_rss_mib": peak_rss_mib()}), flush=True)
        return
    for flag, prefix in (("--prompt-tuning", False), ("--prefix-tuning", True)):
        if flag in sys.argv[1:]:
            name = smollm2_prompt_learning(prefix)
            if name:
                print(json.dumps({"bench": name, "peak_rss_mib": peak_rss_mib()}), flush=True)
            return
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=21128, hidden_size=768, num_hidden_layers=3, num_attention_heads=12,
                     intermediate_size=3072)
    model = BertForSequenceClassification(cfg).train()
    lora = "--lora" in sys.argv[1:]
    if lora:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS")
        model = get_peft_model(model, config).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-5, eps=1e-8, weight_decay=0.01)
    ids = torch.randint(0, cfg.vocab_size, (32, 128))
    mask = torch.ones(32, 128, dtype=torch.int64)
    labels = torch.randint(0, 2, (32,))
    for _ in range(3):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    name = "memory/lora_rbt3_train_step_b32_s128" if lora else "memory/rbt3_train_step_b32_s128"
    print(json.dumps({"bench": name, "peak_rss_mib": peak_rss_mib()}), flush=True)


if __name__ == "__main__":
    main()
