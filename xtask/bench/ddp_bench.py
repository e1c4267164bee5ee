"""The Python side of the `distributed` bench: PyTorch DDP (gloo) on the rbt3-shaped classifier
(3 layers, hidden 768, vocab 21,128), N processes of one thread each, batch 16 per process,
sequence 128, AdamW: the same step as Ember's `ddp_step` example under mpirun. Prints one JSON
line with the median seconds per step (the items: samples per step over all processes).

    python xtask/bench/ddp_bench.py SHARED_DIR [--nproc 2] [--repeats 5]
"""

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers
from transformers import BertConfig, BertForSequenceClassification

transformers.logging.set_verbosity_error()
BATCH = 16


def worker(rank, nproc, init_file, repeats, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=nproc)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=21128, hidden_size=768, num_hidden_layers=3, num_attention_heads=12,
                     intermediate_size=3072)
    model = torch.nn.parallel.DistributedDataParallel(BertForSequenceClassification(cfg).train())
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, eps=1e-8, weight_decay=0.01)
    torch.manual_seed(1 + rank)
    ids = torch.randint(0, cfg.vocab_size, (BATCH, 128))
    mask = torch.ones(BATCH, 128, dtype=torch.int64)
    labels = torch.randint(0, 2, (BATCH,))

    def step():
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()

    step()  # warm-up
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    if rank == 0:
        out.put(statistics.median(times))
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shared")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        mp.start_processes(worker, args=(a.nproc, init_file, a.repeats, out), nprocs=a.nproc, start_method="spawn")
    seconds = out.get()
    name = f"distributed/rbt3_ddp_step_{a.nproc}x1_threads_b{BATCH}_s128"
    print(json.dumps({"bench": name, "median_s": seconds, "items": BATCH * a.nproc}), flush=True)


if __name__ == "__main__":
    main()
