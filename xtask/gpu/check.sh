#!/usr/bin/env bash
# Ember's GPU check: the one command run on the device machine (docs/gpu-check.md).
#
#   bash xtask/gpu/check.sh probe   # ~1 min: GPU, driver, libcuda / libnvrtc, a tiny CUDA run
#   bash xtask/gpu/check.sh full    # ~5-8 min: parity checks, speed rows beside PyTorch, report
#
# Run from the repository root with the carry folder of `cargo xtask gpu-check build`
# (default `gpu-carry/`: the stripped CUDA `ember` and `ember-gpu-check`, gzipped, the MiniLM / SmolLM2
# config and tokenizer files). Everything it keeps goes to $OUT (default ./gpu-check-out) in at
# most three files, because the device tool returns 8 files at most: report.md, log.txt (every
# command's output) and raw.tar.gz (the JSON each check wrote).
#
# Environment:
#   EMBER_GPU_CARRY   carry folder (default gpu-carry)
#   EMBER_GPU_BIN     the `ember` binary (default: $EMBER_GPU_CARRY/ember.gz, unpacked)
#   EMBER_GPU_RUNNER  the `ember-gpu-check` binary (default: $EMBER_GPU_CARRY/ember-gpu-check.gz)
#   EMBER_GPU_PYTHON  Python with torch + transformers (default python3)
#   EMBER_GPU_BUDGET  seconds the whole run may take (default 540: under the tool's 600 s limit);
#                     each check's timeout is cut to what is left, and checks that no longer
#                     fit are skipped and reported as such
#   EMBER_GPU_TINY=1  self-test on a machine without a GPU: tiny models, PyTorch on the CPU,
#                     whatever backend the given binaries were built for
set -u -o pipefail

MODE=${1:-}
case "$MODE" in
probe | full) ;;
*)
    echo "usage: bash xtask/gpu/check.sh probe|full" >&2
    exit 2
    ;;
esac

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT" || exit 2
OUT=${OUT:-$ROOT/gpu-check-out}
CARRY=${EMBER_GPU_CARRY:-gpu-carry}
PY=${EMBER_GPU_PYTHON:-python3}
BUDGET=${EMBER_GPU_BUDGET:-540}
TINY=${EMBER_GPU_TINY:-0}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ember-gpu-check.XXXXXX")
# The binaries travel gzipped (about 50 MiB each stripped, 14 gzipped: both would not fit in
# the 64 MiB otherwise); unpacked here, outside the carry.
mkdir -p "$WORK/bin"
for bin in ember ember-gpu-check; do
    if [[ -f $CARRY/$bin.gz ]]; then
        gzip -dc "$CARRY/$bin.gz" >"$WORK/bin/$bin" && chmod +x "$WORK/bin/$bin"
    elif [[ -f $CARRY/$bin ]]; then
        cp "$CARRY/$bin" "$WORK/bin/$bin"
    fi
done
EMBER=${EMBER_GPU_BIN:-$WORK/bin/ember}
RUNNER=${EMBER_GPU_RUNNER:-$WORK/bin/ember-gpu-check}
mkdir -p "$OUT"
LOG=$OUT/log.txt
: >"$LOG"
START=$SECONDS
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

note() { echo "== $*" | tee -a "$LOG" >&2; }

# step NAME TIMEOUT STDOUT_FILE CMD...: runs CMD under `timeout` (cut to the time left in the
# budget), stdout to STDOUT_FILE (stderr to the log), and records the command, exit status and
# seconds in commands.txt. A step that no longer fits in the budget is skipped (status
# "skipped"); a step past its timeout shows status 124.
step() {
    local name=$1 limit=$2 out=$3
    shift 3
    local left=$((BUDGET - (SECONDS - START) - 15))
    if ((left < 10)); then
        note "$name: skipped, the ${BUDGET}s budget is spent"
        echo "$name: skipped (budget spent): $*" >>"$WORK/commands.txt"
        return 125
    fi
    ((limit > left)) && limit=$left
    note "$name (timeout ${limit}s): $*"
    local t0=$SECONDS rc
    timeout -k 5 "$limit" "$@" >"$out" 2> >(tee -a "$LOG" >&2)
    rc=$?
    echo "$name: exit $rc, $((SECONDS - t0)) s: $*" >>"$WORK/commands.txt"
    ((rc != 0)) && note "$name: exit $rc"
    return $rc
}

# The machine: GPU and driver, the CUDA libraries burn's backend loads at run time (libcuda,
# and libnvrtc: the kernels are compiled when first used), the binaries. Sets HAVE_GPU (0/1).
probe() {
    local s=$WORK/probe_summary.txt
    {
        echo "host: $(uname -srm); $(nproc) CPUs"
        if command -v nvidia-smi >/dev/null && timeout 30 nvidia-smi >/dev/null 2>&1; then
            timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
            timeout 30 nvidia-smi | sed -n '1,12p'
        else
            echo "no GPU: nvidia-smi is missing or fails"
        fi
        echo "--- ldconfig -p (cuda, nvrtc, nccl, cublas)"
        ldconfig -p 2>/dev/null | grep -E 'libcuda\.so|libnvrtc|libnccl|libcublas|libcudart' || echo "none in the ldconfig cache"
        echo "--- files found under /usr /usr/local /opt"
        timeout 60 find /usr /usr/local /opt -xdev \( -name 'libcuda.so*' -o -name 'libnvrtc.so*' -o -name 'libnvrtc-builtins.so*' -o -name 'libnccl.so*' \) 2>/dev/null | sort | head -40
        echo "--- LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
        echo "--- binaries"
        ls -l "$EMBER" "$RUNNER" 2>&1
        echo "ember --version: $("$EMBER" --version 2>&1)"
    } >"$s" 2>&1
    HAVE_GPU=$(grep -q '^no GPU' "$s" && echo 0 || echo 1)
    cat "$s" | tee -a "$LOG"
}

# A tiny CUDA run of each binary: `ember embed` on the tiny BERT fixture (with a vocab.txt made
# here: the fixture has no tokenizer) and one small forward pass of the runner.
smoke() {
    local dir=$WORK/smoke
    mkdir -p "$dir"
    cp tests/fixtures/models/tiny-bert/config.json tests/fixtures/models/tiny-bert/model.safetensors "$dir/"
    {
        printf '%s\n' '[PAD]' '[UNK]' '[CLS]' '[SEP]' '[MASK]'
        for i in $(seq 5 63); do echo "w$i"; done
    } >"$dir/vocab.txt"
    printf 'w5 w6 w7\nw8 w9\n' >"$WORK/smoke_in.txt"
    step smoke_ember_embed 120 "$WORK/smoke_embed.jsonl" "$EMBER" embed --model "$dir" --max-length 16 <"$WORK/smoke_in.txt" &&
        echo "smoke: ember embed printed $(wc -l <"$WORK/smoke_embed.jsonl") embeddings" | tee -a "$LOG"
    step smoke_runner 120 "$WORK/smoke_runner.json" "$RUNNER" bert-forward --shape tiny --batch 2 --seq 8 --warmup 1 --iters 1 &&
        tee -a "$LOG" <"$WORK/smoke_runner.json"
}

finish() {
    # The JSON and text each step wrote; not the models and binaries (hundreds of MB).
    tar -czf "$OUT/raw.tar.gz" -C "$WORK" --exclude ./models --exclude ./smoke --exclude ./bin . 2>/dev/null
    note "done in $((SECONDS - START)) s; $OUT: $(ls "$OUT" | tr '\n' ' ')"
    rm -rf "$WORK"
}

: >"$WORK/commands.txt"
probe
if [[ $HAVE_GPU == 0 && $TINY != 1 ]]; then
    {
        echo "# Ember GPU check: not run"
        echo
        echo "No GPU on this machine (nvidia-smi is missing or fails): nothing was checked."
        echo
        echo '```'
        cat "$WORK/probe_summary.txt"
        echo '```'
    } >"$OUT/report.md"
    finish
    exit 3
fi
smoke
if [[ $MODE == probe ]]; then
    {
        echo "# Ember GPU check: probe"
        echo
        echo '```'
        cat "$WORK/probe_summary.txt"
        echo '```'
        echo
        echo '```'
        cat "$WORK/commands.txt"
        echo '```'
    } >"$OUT/report.md"
    finish
    exit 0
fi

# ---- full
if [[ $TINY == 1 ]]; then
    TINYFLAG=--tiny DEV=cpu SHAPE=tiny FWD_B=4 TRAIN_B=4 SEQ=16 NEW=8 ITERS=2
else
    TINYFLAG= DEV=cuda SHAPE=base FWD_B=64 TRAIN_B=32 SEQ=128 NEW=64 ITERS=10
fi
{
    "$PY" -c 'import sys, torch, transformers; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)'
    echo "ember: $("$EMBER" --version 2>&1)"
    echo "ember-gpu-check: $(ls -l "$RUNNER" 2>&1)"
} >"$WORK/versions.txt" 2>&1
cat "$WORK/versions.txt" | tee -a "$LOG"

# Models of the real shapes with random weights: the real ones do not fit in what travels.
M=$WORK/models
step make_models 240 "$WORK/make_models.jsonl" "$PY" xtask/gpu/torch_reference.py make-models --out "$M" \
    --minilm "$CARRY/minilm" --smollm2 "$CARRY/smollm2" $TINYFLAG

# Parity. The references are PyTorch float32 on the CPU: the computation Ember's CPU results
# were proven against.
step embed_torch 120 "$WORK/embed_torch.jsonl" "$PY" xtask/gpu/torch_reference.py embed --model "$M/minilm" \
    --sentences xtask/gpu/sentences.txt --device cpu
step embed_ember 180 "$WORK/embed_ember.jsonl" "$EMBER" embed --model "$M/minilm" --max-length 256 <xtask/gpu/sentences.txt
PROMPT="The capital of France is"
step generate_torch 120 "$WORK/generate_torch.json" "$PY" xtask/gpu/torch_reference.py generate --model "$M/smollm2" \
    --prompt "$PROMPT" --new 24 --device cpu
step generate_ember 180 "$WORK/generate_ember.json" bash -c \
    'printf %s "$1" | "$2" generate --model "$3" --greedy --max-new-tokens 24 --min-new-tokens 24 --json' \
    _ "$PROMPT" "$EMBER" "$M/smollm2"
step trainer_ember 240 "$WORK/trainer_ember.json" "$RUNNER" trainer-parity \
    --fixture tests/fixtures/train/trainer-expected.json --model tests/fixtures/models/tiny-bert --steps 10

# Speed: Ember's rows one after the other, then PyTorch's, on the same card.
: >"$WORK/speed_ember.jsonl"
for dtype in f32 bf16; do
    step "ember_bert_forward_$dtype" 120 "$WORK/row.json" "$RUNNER" bert-forward --shape $SHAPE \
        --batch $FWD_B --seq $SEQ --dtype $dtype --warmup 2 --iters $ITERS && cat "$WORK/row.json" >>"$WORK/speed_ember.jsonl"
done
step ember_bert_train_step_bf16 180 "$WORK/row.json" "$RUNNER" bert-train-step --shape $SHAPE --batch $TRAIN_B \
    --seq $SEQ --bf16 --warmup 2 --iters $ITERS && cat "$WORK/row.json" >>"$WORK/speed_ember.jsonl"
for b in 1 32; do
    step "ember_decode_bf16_b$b" 150 "$WORK/row.json" "$RUNNER" decode --model "$M/smollm2" --batch $b \
        --prompt 16 --new $NEW --dtype bf16 --warmup 1 --iters 3 && cat "$WORK/row.json" >>"$WORK/speed_ember.jsonl"
done
step torch_speed 240 "$WORK/speed_torch.jsonl" "$PY" xtask/gpu/torch_reference.py speed --smollm2 "$M/smollm2" \
    --device $DEV --iters $ITERS $TINYFLAG

"$PY" xtask/gpu/report.py "$WORK" >"$OUT/report.md" 2> >(tee -a "$LOG" >&2)
RC=$?
cat "$OUT/report.md"
finish
exit $RC
