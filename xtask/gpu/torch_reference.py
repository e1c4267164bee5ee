"""PyTorch's side of the GPU check (`xtask/gpu/check.sh full`): the models both sides load, the
reference values of the parity checks, and PyTorch's timings of the speed rows.

    python torch_reference.py make-models --out DIR --minilm TOKDIR --smollm2 TOKDIR [--tiny]
    python torch_reference.py embed --model DIR --sentences FILE [--device cpu]
    python torch_reference.py generate --model DIR --prompt TEXT [--new 24] [--device cpu]
    python torch_reference.py speed --smollm2 DIR [--device cuda] [--tiny]

The real all-MiniLM-L6-v2 (87 MB) and SmolLM2-135M-Instruct (514 MB) weights do not fit in the
64 MiB that travels to the device machine, so `make-models` writes models of their shapes with
random weights (fixed seeds) beside their real tokenizer and config files; Ember and PyTorch
then load the same folders. Each subcommand prints JSON lines on stdout. `--tiny` shrinks the
models and the speed rows so that the whole script runs on a CPU in a minute (self-test).
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import time

import torch
import transformers
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
)

# Tokenizer and config files copied from the real model folders (whichever exist).
TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "generation_config.json",
    "chat_template.jinja",
]


def make_models(args):
    """Random-weight MiniLM-shaped BERT and SmolLM2-shaped Llama, float32 safetensors."""
    for name, src in (("minilm", args.minilm), ("smollm2", args.smollm2)):
        dest = os.path.join(args.out, name)
        os.makedirs(dest, exist_ok=True)
        for f in TOKENIZER_FILES:
            if os.path.exists(os.path.join(src, f)):
                shutil.copy(os.path.join(src, f), dest)
        with open(os.path.join(src, "config.json")) as f:
            config = json.load(f)
        # float32 weights on both sides: the parity checks compare float32 computation.
        config.pop("torch_dtype", None)
        config["dtype"] = "float32"
        if name == "minilm":
            if args.tiny:
                config.update(num_hidden_layers=2)
            torch.manual_seed(0)
            model = BertModel(BertConfig(**config), add_pooling_layer=True)
        else:
            if args.tiny:
                config.update(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16)
            torch.manual_seed(0)
            model = LlamaForCausalLM(LlamaConfig(**config))
        model = model.float().eval()
        model.save_pretrained(dest, safe_serialization=True)
        params = sum(p.numel() for p in model.parameters())
        print(json.dumps({"made": dest, "params": params}), flush=True)


def embed(args):
    """sentence-transformers' mean pooling + L2 normalisation and the CLS row, one sentence at
    a time (as `ember embed` does), in float32: the lines `ember embed` prints."""
    device = torch.device(args.device)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = BertModel.from_pretrained(args.model, attn_implementation="eager").to(device).eval()
    with open(args.sentences) as f:
        sentences = [line.rstrip("\n") for line in f]
    with torch.no_grad():
        for s in sentences:
            enc = tokenizer(s, return_tensors="pt", truncation=True, max_length=256).to(device)
            h = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            mean = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            mean = torch.nn.functional.normalize(mean, p=2, dim=1)
            print(json.dumps({"mean_normalized": mean[0].tolist(), "cls": h[0, 0].tolist()}), flush=True)


def generate(args):
    """Greedy ids for one prompt (exactly --new tokens), and at each step the gap between the
    best and second-best logit: a step where Ember picks another token is a bug only if that gap
    is well above float32 rounding."""
    device = torch.device(args.device)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = LlamaForCausalLM.from_pretrained(args.model).to(device).eval()
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                             min_new_tokens=args.new, do_sample=False, output_scores=True,
                             return_dict_in_generate=True,
                             pad_token_id=model.config.eos_token_id)
    new = out.sequences[0, ids.shape[1]:].tolist()
    margins = []
    for scores in out.scores:
        top = torch.topk(scores[0].float(), 2).values
        margins.append(float(top[0] - top[1]))
    print(json.dumps({"prompt_ids": ids[0].tolist(), "generated_ids": new, "margins": margins}), flush=True)


def timed(fn, warmup, iters, sync):
    warm = []
    for _ in range(warmup):
        t = time.perf_counter()
        fn()
        sync()
        warm.append(time.perf_counter() - t)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times, "warmup_s": warm}


def bert_config(tiny):
    """The shapes of `xtask/gpu/runner/main.rs`'s `bert_config`: bert-base-uncased or tiny."""
    if tiny:
        config = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=128)
    else:
        config = BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                            intermediate_size=3072)
    # PyTorch's fused attention (scaled_dot_product_attention), as transformers picks by default.
    config._attn_implementation = "sdpa"
    return config


def speed(args):
    """PyTorch's rows, each named as Ember's runner names its own."""
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    shape = "tiny" if args.tiny else "base"
    fwd_batch, train_batch, seq = (4, 4, 16) if args.tiny else (64, 32, 128)
    iters = 2 if args.tiny else args.iters
    config = bert_config(args.tiny)
    print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
                      "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                      "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}), flush=True)

    g = torch.Generator().manual_seed(0)
    for dtype in ("f32", "bf16"):
        torch.manual_seed(0)
        model = BertModel(config, add_pooling_layer=True).to(device).eval()
        if dtype == "bf16":
            model = model.bfloat16()
        ids = torch.randint(0, config.vocab_size, (fwd_batch, seq), generator=g).to(device)
        mask = torch.ones_like(ids)

        def fwd():
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask).last_hidden_state.sum().item()

        print(json.dumps({"check": f"bert_{shape}_forward_{dtype}_b{fwd_batch}_s{seq}", "side": "torch",
                          "params": sum(p.numel() for p in model.parameters()),
                          "timing": timed(fwd, 2, iters, sync)}), flush=True)
        del model

    torch.manual_seed(0)
    model = BertForSequenceClassification(config).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01, eps=1e-8)
    ids = torch.randint(0, config.vocab_size, (train_batch, seq), generator=g).to(device)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 2, (train_batch,), generator=g).to(device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    print(json.dumps({"check": f"bert_{shape}_train_step_bf16_b{train_batch}_s{seq}", "side": "torch",
                      "params": sum(p.numel() for p in model.parameters()), "tokens": train_batch * seq,
                      "timing": timed(step, 2, iters, sync)}), flush=True)
    del model, opt

    model = LlamaForCausalLM.from_pretrained(args.smollm2).to(device).to(torch.bfloat16).eval()
    vocab = model.config.vocab_size
    prompt, new = 16, (8 if args.tiny else 64)
    for batch in (1, 32):
        # The prompts of Ember's runner (`decode`): deterministic ids, no padding.
        rows = [[(100 + 37 * (r + 1) * t) % min(vocab, 40000) for t in range(prompt)] for r in range(batch)]
        ids = torch.tensor(rows, device=device)

        def gen():
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                     min_new_tokens=new, do_sample=False,
                                     pad_token_id=model.config.eos_token_id)
            assert out.shape[1] == prompt + new

        print(json.dumps({"check": f"smollm2_decode_bf16_b{batch}_p{prompt}_n{new}", "side": "torch",
                          "tokens": batch * new, "timing": timed(gen, 1, min(iters, 3), sync)}), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make-models")
    m.add_argument("--out", required=True)
    m.add_argument("--minilm", required=True, help="folder with MiniLM's config.json and tokenizer files")
    m.add_argument("--smollm2", required=True, help="folder with SmolLM2's config.json and tokenizer files")
    m.add_argument("--tiny", action="store_true")
    e = sub.add_parser("embed")
    e.add_argument("--model", required=True)
    e.add_argument("--sentences", required=True)
    e.add_argument("--device", default="cpu")
    g = sub.add_parser("generate")
    g.add_argument("--model", required=True)
    g.add_argument("--prompt", required=True)
    g.add_argument("--new", type=int, default=24)
    g.add_argument("--device", default="cpu")
    s = sub.add_parser("speed")
    s.add_argument("--smollm2", required=True)
    s.add_argument("--device", default="cuda")
    s.add_argument("--iters", type=int, default=10)
    s.add_argument("--tiny", action="store_true")
    args = p.parse_args()
    transformers.logging.set_verbosity_error()
    {"make-models": make_models, "embed": embed, "generate": generate, "speed": speed}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
