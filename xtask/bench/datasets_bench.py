"""The Python side of the `datasets_pipeline` bench: the same ChnSentiCorp pipeline through
`datasets` 5.2 (`map(batched=True)`, no cache), `transformers` 5.24 and torch's DataLoader with
DataCollatorWithPadding. Prints one JSON line per case with the median seconds.

    python xtask/bench/datasets_bench.py SHARED_DIR [--repeats N]
"""

import argparse
import json
import os
import statistics
import time

import datasets
import torch
from transformers import BertTokenizer, DataCollatorWithPadding

datasets.disable_progress_bars()
datasets.disable_caching()


def timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shared")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    tok = BertTokenizer.from_pretrained(os.path.join(a.shared, "models/bert-base-chinese-vocab"))
    ds = datasets.load_dataset("csv", data_files=os.path.join(a.shared, "data/chnsenticorp/ChnSentiCorp_htl_all.csv"), split="train")
    ds = ds.filter(lambda r: r["review"] is not None)

    def tokenize_map():
        return ds.map(lambda b: tok(b["review"], truncation=True, max_length=128), batched=True,
                      batch_size=1000, remove_columns=["review"], load_from_cache_file=False, keep_in_memory=True)

    tokenized = tokenize_map().rename_column("label", "labels")
    loader = torch.utils.data.DataLoader(tokenized, batch_size=32, shuffle=True,
                                         collate_fn=DataCollatorWithPadding(tok, return_tensors="pt"))

    def epoch():
        return sum(b["input_ids"].shape[0] for b in loader)

    n = len(ds)
    print(json.dumps({"bench": "datasets_pipeline/tokenize_map_chnsenticorp", "median_s": timed(tokenize_map, a.repeats), "items": n}))
    print(json.dumps({"bench": "datasets_pipeline/dataloader_epoch_chnsenticorp", "median_s": timed(epoch, a.repeats), "items": n}))


if __name__ == "__main__":
    main()
