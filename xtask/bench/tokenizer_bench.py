"""The Python side of the `batch_encode` benchmark: the same sentences, batches and options
through `transformers` 5 (Rust `tokenizers` underneath). Prints one JSON line per case with the
median seconds over repeated runs.

    python xtask/bench/tokenizer_bench.py SHARED_DIR [--repeats N]
"""

import argparse
import csv
import json
import os
import statistics
import time

from transformers import AutoTokenizer, BertTokenizer

N = 2000
BATCH = 64


def reviews(shared):
    with open(os.path.join(shared, "data/chnsenticorp/ChnSentiCorp_htl_all.csv"), encoding="utf-8", newline="") as f:
        return [r["review"] for r in csv.DictReader(f) if r["review"]][:N]


def conll(shared):
    out, cur = [], []
    with open(os.path.join(shared, "data/ner/conll2003/train.txt"), encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip():
                if cur:
                    out.append(" ".join(cur))
                    cur = []
            else:
                w = line.split(" ")[0]
                if w != "-DOCSTART-":
                    cur.append(w)
    return out[:N]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shared")
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args()
    cases = [
        ("minilm_conll2003", AutoTokenizer.from_pretrained(os.path.join(a.shared, "models/all-MiniLM-L6-v2")), conll(a.shared)),
        ("bert_chinese_chnsenticorp", BertTokenizer.from_pretrained(os.path.join(a.shared, "models/bert-base-chinese-vocab")), reviews(a.shared)),
    ]
    for name, tok, texts in cases:
        times = []
        for _ in range(a.repeats + 1):
            t0 = time.perf_counter()
            for i in range(0, len(texts), BATCH):
                tok(texts[i : i + BATCH], padding=True, truncation=True, max_length=128)
            times.append(time.perf_counter() - t0)
        times = times[1:]  # the first run warms caches
        print(json.dumps({"bench": f"batch_encode/{name}", "median_s": statistics.median(times), "items": len(texts)}))


if __name__ == "__main__":
    main()
