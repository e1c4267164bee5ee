"""The Python side of the `trainer` bench: one epoch of `transformers.Trainer` (5.24, torch 2.15)
over the first 128 non-empty ChnSentiCorp reviews, tokenized with the bert-base-chinese
vocabulary (truncated to 128, padded per batch by DataCollatorWithPadding), batches of 32,
AdamW, a 3-layer, hidden-256 BertForSequenceClassification built from config. Prints one JSON
line with the median seconds.

    python xtask/bench/trainer_bench.py SHARED_DIR [--repeats N]
"""

import argparse
import contextlib
import csv
import io
import json
import os
import statistics
import tempfile
import time

import torch
import transformers
from transformers import (BertConfig, BertForSequenceClassification, BertTokenizer, DataCollatorWithPadding, Trainer,
                          TrainingArguments)

ROWS = 128


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shared")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    transformers.logging.set_verbosity_error()
    tok = BertTokenizer.from_pretrained(os.path.join(a.shared, "models/bert-base-chinese-vocab"))
    with open(os.path.join(a.shared, "data/chnsenticorp/ChnSentiCorp_htl_all.csv"), newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["review"]][:ROWS]
    enc = tok([r["review"] for r in rows], truncation=True, max_length=128)
    train = [{"input_ids": ids, "token_type_ids": t, "attention_mask": m, "labels": int(r["label"])}
             for ids, t, m, r in zip(enc["input_ids"], enc["token_type_ids"], enc["attention_mask"], rows)]
    config = BertConfig(vocab_size=21128, hidden_size=256, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=1024)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def epoch():
        model.load_state_dict(state)
        with tempfile.TemporaryDirectory() as tmp:
            args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=32, num_train_epochs=1,
                                     save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True)
            trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=DataCollatorWithPadding(tok))
            # Trainer prints its summary on stdout, which carries only this script's JSON line.
            with contextlib.redirect_stdout(io.StringIO()):
                trainer.train()

    epoch()  # warm-up
    times = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        epoch()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"bench": "trainer/epoch_chnsenticorp_128_rows", "median_s": statistics.median(times), "items": ROWS}))


if __name__ == "__main__":
    main()
