"""Writes the GPU check's `report.md` from the files `xtask/gpu/check.sh full` left in a folder:
the parity results, the speed rows side by side with ratios, and the training step's model
FLOP utilisation. Standard library only (it runs under the device machine's python3).

    python3 report.py DIR > DIR/report.md
"""

import json
import os
import sys

# The card's bf16 matrix rate as measured on the lent H200 (the device notes' KINDS.md).
PEAK_BF16 = 790e12
TOL = 1e-4


def lines(path):
    """The JSON objects of a file of JSON lines (other lines, such as progress bars, skipped)."""
    out = []
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return out


def text(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read().strip()


def embed_parity(d):
    ours, theirs = lines(os.path.join(d, "embed_ember.jsonl")), lines(os.path.join(d, "embed_torch.jsonl"))
    if not ours or len(ours) != len(theirs):
        return f"not run or failed: {len(ours)} Ember lines, {len(theirs)} PyTorch lines (see the logs)", False
    worst = 0.0
    for a, b in zip(ours, theirs):
        for key in ("mean_normalized", "cls"):
            worst = max(worst, max(abs(x - y) for x, y in zip(a[key], b[key])))
    ok = worst <= TOL
    return f"{len(ours)} sentences, max |Ember - PyTorch| over mean_normalized and cls = {worst:.2e} (tolerance {TOL:g}): {'pass' if ok else 'FAIL'}", ok


def generate_parity(d):
    ours, theirs = lines(os.path.join(d, "generate_ember.json")), lines(os.path.join(d, "generate_torch.json"))
    if not ours or not theirs:
        return "not run or failed (see the logs)", False
    a, b = ours[0], theirs[0]
    if a["prompt_ids"] != b["prompt_ids"]:
        return f"prompt ids differ: Ember {a['prompt_ids']}, PyTorch {b['prompt_ids']}", False
    x, y = a["generated_ids"], b["generated_ids"]
    same = 0
    for p, q in zip(x, y):
        if p != q:
            break
        same += 1
    ok = x == y and len(x) == len(b["margins"])
    smallest = min(b["margins"]) if b["margins"] else float("nan")
    msg = f"{same} of {len(y)} greedy ids equal; smallest top-1/top-2 logit gap in PyTorch's run {smallest:.2e}"
    if not ok and same < len(b["margins"]):
        msg += f"; first difference at step {same + 1}, where PyTorch's gap was {b['margins'][same]:.2e}"
    return msg + (": pass" if ok else ": FAIL"), ok


def trainer_parity(d):
    rows = lines(os.path.join(d, "trainer_ember.json"))
    if not rows:
        return "not run or failed (see the logs)", False
    r = rows[0]
    return (f"first {r['steps']} losses, max |Ember - fixture| = {r['max_abs_diff']:.2e} (tolerance {r['tolerance']:g}): "
            f"{'pass' if r['pass'] else 'FAIL'}; Ember {', '.join(f'{v:.4f}' for v in r['losses'])}"), r["pass"]


def main():
    d = sys.argv[1]
    print("# Ember GPU check: report\n")
    print(f"Written by `xtask/gpu/report.py` from the files of `bash xtask/gpu/check.sh full` in `{d}`.\n")
    for name, title in (("probe_summary.txt", "Machine"), ("versions.txt", "Versions")):
        t = text(os.path.join(d, name))
        if t:
            print(f"## {title}\n\n```\n{t}\n```\n")
    print("## Parity\n")
    print("| check | result |\n|---|---|")
    all_ok = True
    for title, fn in (("all-MiniLM-L6-v2 shape embeddings (random weights), Ember vs PyTorch CPU f32", embed_parity),
                      ("SmolLM2-135M shape greedy ids, 24 tokens (random weights), Ember vs PyTorch CPU f32", generate_parity),
                      ("Trainer losses, tests/fixtures/train (HF Trainer's values, which Ember's CPU run matches)", trainer_parity)):
        msg, ok = fn(d)
        all_ok &= ok
        print(f"| {title} | {msg} |")
    print()

    rows = {}
    for side, path in (("ember", "speed_ember.jsonl"), ("torch", "speed_torch.jsonl")):
        for r in lines(os.path.join(d, path)):
            if "check" in r:
                rows.setdefault(r["check"], {})[side] = r
    info = [r for r in lines(os.path.join(d, "speed_torch.jsonl")) if "torch" in r]
    print("## Speed (medians; ratio = Ember time / PyTorch time, under 1 means Ember is faster)\n")
    if info:
        print(f"PyTorch side: {json.dumps(info[0])}\n")
    print("| row | Ember | PyTorch | Ember / PyTorch | Ember MFU | PyTorch MFU |\n|---|---|---|---|---|---|")
    for check in sorted(rows):
        e, t = rows[check].get("ember"), rows[check].get("torch")
        es = e["timing"]["median_s"] if e else None
        ts = t["timing"]["median_s"] if t else None
        ratio = f"**{es / ts:.2f}**" if es and ts else "-"
        mfu_e = mfu_t = ""
        if "train_step" in check:
            # 6 · parameters · tokens per step: the usual estimate of a training step's FLOPs
            # (forward 2, backward 4 per parameter and token; attention scores not counted).
            params = (t or e)["params"]
            tokens = (t or e)["tokens"]
            flops = 6 * params * tokens
            mfu_e = f"{flops / es / PEAK_BF16:.1%}" if es else ""
            mfu_t = f"{flops / ts / PEAK_BF16:.1%}" if ts else ""
        fmt = lambda s: f"{s * 1000:.1f} ms" if s is not None else "failed / not run"
        print(f"| `{check}` | {fmt(es)} | {fmt(ts)} | {ratio} | {mfu_e} | {mfu_t} |")
    print(f"\nMFU = 6 · params · tokens / step time / {PEAK_BF16 / 1e12:.0f} TFLOP/s (the card's measured bf16 peak).\n")
    t = text(os.path.join(d, "commands.txt"))
    if t:
        print(f"## Commands (as run, with their exit status and seconds)\n\n```\n{t}\n```\n")
    print(f"Overall parity: {'pass' if all_ok else 'FAIL'}")
    # check.sh's exit status: a failed parity check must not read as a successful run.
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
