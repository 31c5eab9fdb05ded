#!/usr/bin/env bash
# Everything gpt2kids checks on a CUDA GPU, in one unattended command, ending in one summary table.
#
#   bash bench/cuda_check.sh                  # a GPU machine that reaches PyPI: installs into a fresh venv
#   bash bench/cuda_check.sh --python PY      # PY already has CUDA torch and the dev and bench extras
#   bash bench/cuda_check.sh --dry-run        # any machine, CPU: the same steps at tiny sizes (the CUDA tests
#                                             # rehearsed on the CPU), to test this script
#   options: --work DIR (default: a new folder under /tmp), --wheels DIR (pip installs offline from DIR),
#            --budget SECONDS (no step runs past this much time from the start; steps that no longer fit are
#            skipped), --out DIR (after every step, summary.md, logs.tar.gz and train_step.json are copied
#            there, so a run killed from outside still leaves its results)
#
# Steps, most important first, each under a time limit so that the script always reaches its summary:
#   copy      a fresh copy of the repository (its tracked and untracked, not ignored files) in WORK/repo
#   install   a venv in WORK/venv: `pip install torch` (on Linux x86-64 PyPI's default wheel is the CUDA
#             build; the driver must support its CUDA version), then `pip install -e ".[dev,bench]"`
#   peak      the card's bf16 matmul peak: 8192^3 products timed with CUDA events
#   prepare   a random GPT-2 Small saved with transformers, with a BPE trained on the bundled stories, and
#             the bundled stories repeated to ~860 KB, the size of the published run's corpus
#   finetune  python train.py --init <that model> --data <that corpus> --epochs 10 --device cuda, timed
#             end to end; the summary adds the MFU of its optimizer steps against the peak above
#   tests     pytest -m cuda tests/test_cuda.py -k "not compile" (HF parity in fp32 and bf16, a bf16
#             training run, fp16 with the grad scaler, greedy generate.py against transformers)
#   train     python bench/train_step.py --device cuda --compile (GPT-2 Small, 4 x 512); its MFU uses a
#             3072^3 matmul as the roof, so the summary also gives MFU against the peak measured above
#   compiled  pytest -m cuda tests/test_cuda.py -k compile (--compile against eager, training and decoding)
#   generate  python bench/generate.py --device cuda --repeats 2 (batch 1 and 8, fp32 and bf16; on a
#             dedicated GPU two interleaved rounds suffice); the summary adds what --precision auto
#             picks and whether it decoded slower than fp32 in any row
# torch.compile on a GPU builds Triton's launcher with a C compiler and Python's headers: without them
# `train` runs without --compile and `compiled` is skipped, and the summary says so.
# Logs: WORK/logs/<step>.log; the summary: WORK/summary.md, rewritten after every step. Exit status: 0 when
# every step passed.
# The repeated stories put copies of training stories in the held-out split: the fine-tune's eval loss
# shows that training ran, it is not a quality figure; its time is the point.
# Not measured on a GPU yet: the time limits below are estimates for an H100/H200-class card
# (8 minutes or more in all, the install's download aside: under --budget 480 the last steps may be skipped). With a lent machine that reaches no package
# index and whose python3 already holds CUDA torch, transformers, pytest and tensorboard (bench/README.md):
#   bash bench/cuda_check.sh --python python3 --budget 480 --out "$OUT"

set -uo pipefail

DRY_RUN=0
PYTHON=""
WORK=""
WHEELS=""
BUDGET=0
OUT=""
while (($#)); do
    case $1 in
        --dry-run) DRY_RUN=1 ;;
        --python) PYTHON=$2; shift ;;
        --work) WORK=$2; shift ;;
        --wheels) WHEELS=$2; shift ;;
        --budget) BUDGET=$2; shift ;;
        --out) OUT=$2; shift ;;
        -h | --help) sed -n '2,39p' "$0"; exit 0 ;;
        *) echo "cuda_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

STARTED=$(date +%s)
RESERVE=45  # seconds kept back for a step's kill grace (timeout --kill-after=30) and the summary
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ $PYTHON == */* ]]; then  # the steps run in the work folder: a relative path would no longer point at it
    PYTHON=$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")
fi
WORK=${WORK:-$(mktemp -d /tmp/gpt2kids-cuda-check.XXXXXX)}
mkdir -p "$WORK/logs"
WORK=$(cd "$WORK" && pwd)
if [[ -n $OUT ]]; then
    mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false GPT2KIDS_CACHE="$WORK/cache"
if ((DRY_RUN)); then
    DEVICE=cpu
    PYTHON=${PYTHON:-$(command -v python3)}
    export GPT2KIDS_CUDA_TESTS_ON=cpu  # tests/test_cuda.py rehearsed on the CPU
else
    DEVICE=cuda
fi

NAMES=() RESULTS=() TIMES=() FIGURES=()
FAILED=0

# run_step NAME LIMIT_SECONDS COMMAND...: runs COMMAND in WORK/repo, output to WORK/logs/NAME.log; with
# --budget the limit shrinks to the time left, and a step with less than a minute left is skipped.
run_step() {
    local name=$1 limit=$2 start status result left
    shift 2
    if ((BUDGET > 0)); then
        left=$((BUDGET - ($(date +%s) - STARTED) - RESERVE))
        if ((left < 60)); then
            echo "== $name: skipped, ${left} s of the budget left" >&2
            NAMES+=("$name") RESULTS+=("skipped (out of --budget)") TIMES+=(0) FIGURES+=("")
            FAILED=1
            save
            return 1
        fi
        ((limit > left)) && limit=$left
    fi
    echo "== $name (limit ${limit} s): $*" >&2
    start=$(date +%s)
    (cd "$WORK/repo" && timeout --kill-after=30 "$limit" "$@") >"$WORK/logs/$name.log" 2>&1
    status=$?
    case $status in
        0) result=passed ;;
        124 | 137) result="timed out" ;;
        *) result="failed ($status)" ;;
    esac
    ((status == 0)) || FAILED=1
    NAMES+=("$name") RESULTS+=("$result") TIMES+=("$(($(date +%s) - start))") FIGURES+=("")
    tail -n 15 "$WORK/logs/$name.log" >&2
    save
    return "$status"
}

# figure TEXT: the figures column of the last step.
figure() {
    FIGURES[${#FIGURES[@]} - 1]=$1
    save
}

# save: write WORK/summary.md, and with --out copy it there with the logs and train_step.json.
save() {
    {
        echo "gpt2kids CUDA check, $(date -u '+%Y-%m-%d %H:%M UTC'), $(hostname), $(($(date +%s) - STARTED)) s"
        echo "device: ${GPU:-not known yet}; work folder: $WORK"
        echo
        echo "| step | result | seconds | figures |"
        echo "| --- | --- | ---: | --- |"
        local i
        for i in "${!NAMES[@]}"; do
            echo "| ${NAMES[i]} | ${RESULTS[i]} | ${TIMES[i]} | ${FIGURES[i]} |"
        done
    } >"$WORK/summary.md"
    if [[ -n $OUT ]]; then
        mkdir -p "$OUT"
        cp "$WORK/summary.md" "$OUT/summary.md"
        tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs
        [[ -f $WORK/train_step.json ]] && cp "$WORK/train_step.json" "$OUT/"
    fi
    return 0
}

# shellcheck disable=SC2317  # called by the EXIT trap
finish() {
    save
    cat "$WORK/summary.md"
}
trap finish EXIT

# --- copy and install -----------------------------------------------------------------------------

mkdir -p "$WORK/repo"
if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    run_step copy 120 bash -c "cd '$REPO' && git ls-files -z --cached --others --exclude-standard \
        | tar --null -T - -cf - | tar -xf - -C '$WORK/repo'"
else
    run_step copy 120 bash -c "cp -a '$REPO'/. '$WORK/repo'/ && rm -rf '$WORK/repo/.venv' '$WORK/repo/runs'"
fi || exit 1
figure "$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'not a git checkout')"

if [[ -z $PYTHON ]]; then
    python3 -m venv "$WORK/venv" || exit 1
    PYTHON="$WORK/venv/bin/python"
    PIP=("$PYTHON" -m pip install --disable-pip-version-check)
    [[ -n $WHEELS ]] && PIP+=(--no-index --find-links "$WHEELS")
    run_step install 600 bash -c "$(printf '%q ' "${PIP[@]}") torch && $(printf '%q ' "${PIP[@]}") -e '.[dev,bench]'" \
        || exit 1
else
    run_step install 60 "$PYTHON" -c "import torch, transformers, pytest; print(torch.__version__)" || exit 1
fi
figure "torch $("$PYTHON" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)' 2>/dev/null)"

if ((DRY_RUN)); then
    GPU="CPU (dry run: tiny sizes, CUDA steps on CPU)"
else
    GPU=$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "")')
    if [[ -z $GPU ]]; then
        echo "cuda_check.sh: torch sees no CUDA GPU (nvidia-smi: $(nvidia-smi -L 2>&1 | head -1)); nothing to check" >&2
        FAILED=1
        exit 1
    fi
fi

# torch.compile on CUDA: Triton builds its launcher with a C compiler against Python's headers.
COMPILER=1
if ! ((DRY_RUN)); then
    if ! { command -v cc || command -v gcc; } >/dev/null 2>&1 || ! "$PYTHON" -c \
        'import os, sys, sysconfig; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'
    then
        COMPILER=0
        echo "cuda_check.sh: no C compiler or no Python.h here: --compile is not checked" >&2
    fi
fi

# --- the card's matmul peak -----------------------------------------------------------------------

PEAK_SIZE=8192
((DRY_RUN)) && PEAK_SIZE=1024
run_step peak 120 "$PYTHON" - "$DEVICE" "$PEAK_SIZE" <<'EOF'
import sys, time, torch
device, size = torch.device(sys.argv[1]), int(sys.argv[2])
a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
best = float("inf")
for _ in range(5):
    for _ in range(2):
        a @ b  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    best = min(best, (time.perf_counter() - start) / 10)
print(f"PEAK_FLOPS {2 * size**3 / best:.6g}")
EOF
PEAK=$(awk '/^PEAK_FLOPS/ {print $2}' "$WORK/logs/peak.log")
figure "bf16 ${PEAK:-?} FLOP/s (${PEAK_SIZE}^3)"

# --- a timed fine-tune of GPT-2 Small shapes on a corpus of the published run's size ---------------

if ((DRY_RUN)); then
    MODEL='{"n_positions": 128, "n_embd": 64, "n_layer": 2, "n_head": 2}' VOCAB=1000
    FINETUNE_ARGS=(--epochs 1 --max-steps 30 --batch-size 2 --block-size 64 --device cpu)
else
    MODEL='{}' VOCAB=50257  # transformers' GPT2Config defaults: GPT-2 Small
    FINETUNE_ARGS=(--epochs 10 --device cuda)
fi
run_step prepare 300 "$PYTHON" - "$WORK" "$VOCAB" "$MODEL" <<'EOF'
import json, shutil, sys
from pathlib import Path

from transformers import GPT2Config, GPT2LMHeadModel

from gpt2kids.data import BUNDLED_STORIES, read_stories
from gpt2kids.tokenizer import Tokenizer

work, vocab, shape = Path(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
corpus = work / "corpus"
shutil.rmtree(corpus, ignore_errors=True)
corpus.mkdir()
stories = sorted(BUNDLED_STORIES.glob("*.txt"))
size, copy = 0, 0
while size < 860_000:  # the published run's corpus: ~860 KB of stories
    for story in stories:
        target = corpus / f"{copy:02d}-{story.name}"
        shutil.copy(story, target)
        size += target.stat().st_size
    copy += 1
tokenizer = Tokenizer.train(read_stories(BUNDLED_STORIES), vocab)
init = work / "init"
config = GPT2Config(vocab_size=vocab, bos_token_id=tokenizer.eos_id, eos_token_id=tokenizer.eos_id, **shape)
GPT2LMHeadModel(config).save_pretrained(init)
tokenizer.save(init)
print(f"corpus {size} bytes in {len(list(corpus.iterdir()))} files; init {init} ({config.n_layer} layers)")
EOF
figure "$(tail -n 1 "$WORK/logs/prepare.log")"

run_step finetune 600 "$PYTHON" train.py --init "$WORK/init" --data "$WORK/corpus" --out "$WORK/run" "${FINETUNE_ARGS[@]}"
# The MFU of the run's optimizer steps against the card's peak: the tokens its steps fed the model (from
# the run's settings, its first line and its step count) at the FLOPs per token of bench/train_step.py.
FINETUNE_MFU=$(cd "$WORK/repo" && "$PYTHON" - "$WORK/run" "$WORK/logs/finetune.log" "${PEAK:-0}" <<'EOF' 2>/dev/null
import json, re, sys
from pathlib import Path

sys.path.insert(0, "bench")
from benchutil import FlopModel

from gpt2kids.config import GPT2Config

run, log, peak = Path(sys.argv[1]), Path(sys.argv[2]).read_text(), float(sys.argv[3])
settings = json.loads((run / "train_config.json").read_text())
step = json.loads((run / "checkpoint" / "progress.json").read_text())["step"]
found = re.search(r"([\d,]+) training blocks of (\d+) tokens, (\d+) steps per epoch", log)
blocks, block, steps_per_epoch = (int(value.replace(",", "")) for value in found.groups())
per_step = settings["batch_size"] * settings["grad_accum"]
tokens = (step // steps_per_epoch * blocks + min(step % steps_per_epoch * per_step, blocks)) * block
step_seconds = max(float(re.search(r"took [\d.]+ s: ([\d.]+) s in optimizer steps", log).group(1)), 0.05)  # printed to 0.1 s
flops = tokens * FlopModel.of(GPT2Config.from_json_file(run / "final" / "config.json")).per_token(block)
print(f"; optimizer steps {tokens / step_seconds:,.0f} tokens/s, MFU {flops / step_seconds / peak:.1%} of the card's peak")
EOF
)
# The run's first line (parameters, blocks, steps), its last epoch line (losses, seconds), where its time
# went (optimizer steps, evaluation, writing checkpoints and exports), and the MFU of its steps.
figure "$(grep -m 1 -o '[0-9,]* parameters on .*' "$WORK/logs/finetune.log")$(grep -E '^epoch [0-9]+/[0-9]+: ' \
    "$WORK/logs/finetune.log" | tail -n 1 | sed 's/^/; /')$(grep -m 1 '^time: ' "$WORK/logs/finetune.log" | sed 's/^/; /')$FINETUNE_MFU"

# --- the CUDA tests (those that compile come after the training step) --------------------------------

run_step tests 240 "$PYTHON" -m pytest -m cuda tests/test_cuda.py -k "not compile" -p no:cacheprovider -rs
figure "$(grep -E '(passed|failed|skipped|error)' "$WORK/logs/tests.log" | tail -n 1 | tr -d '=|')"

# --- the training step, against transformers ------------------------------------------------------

TRAIN_ARGS=(--device "$DEVICE" --json "$WORK/train_step.json")
if ((DRY_RUN)); then
    TRAIN_ARGS+=(--model-size tiny --batch 2 --block 64 --steps 1 --warmup 1)
elif ((COMPILER)); then
    TRAIN_ARGS+=(--compile)
fi
run_step train 300 "$PYTHON" bench/train_step.py "${TRAIN_ARGS[@]}"
((COMPILER)) || FIGURE_NOTE="eager (no C compiler or Python.h for Triton): "
figure "${FIGURE_NOTE:-}$("$PYTHON" - "$WORK/train_step.json" "${PEAK:-0}" <<'EOF' 2>/dev/null
import json, sys
results, peak = json.load(open(sys.argv[1])), float(sys.argv[2])
parts = []
for row in results["rows"]:
    card = f", {row['tokens_per_s'] * results['flops_per_token'] / peak:.1%} of the card's peak" if peak else ""
    parts.append(f"{row['side']} {row['precision']} {row['tokens_per_s']:.0f} tok/s, MFU {row['mfu']:.1%}{card}")
print("; ".join(parts))
EOF
)"

# --- the compiled paths' tests ------------------------------------------------------------------------

if ((COMPILER)); then
    run_step compiled 240 "$PYTHON" -m pytest -m cuda tests/test_cuda.py -k compile -p no:cacheprovider -rs
    figure "$(grep -E '(passed|failed|skipped|error)' "$WORK/logs/compiled.log" | tail -n 1 | tr -d '=|')"
else
    NAMES+=(compiled) RESULTS+=("skipped (no C compiler or Python.h for Triton)") TIMES+=(0) FIGURES+=("")
    FAILED=1
    save
fi

# --- decoding ---------------------------------------------------------------------------------------

GENERATE_ARGS=(--device "$DEVICE" --repeats 2)
((DRY_RUN)) && GENERATE_ARGS=(--device cpu --model-size tiny --repeats 1 --new-tokens 4 --batch-new-tokens 4
                              --short-tokens 2 --dtype fp32)
run_step generate 300 "$PYTHON" bench/generate.py "${GENERATE_ARGS[@]}"
figure "$(awk -F'|' '$2 ~ /^ *[0-9]+ *$/ && $4 ~ /greedy/ {
    gsub(/ /, "", $2); gsub(/ /, "", $3); gsub(/ /, "", $5); gsub(/ /, "", $6)
    printf "%sbatch %s %s greedy %s vs %s tok/s", sep, $2, $3, $5, $6; sep = "; " }' "$WORK/logs/generate.log")$(
    sed -n 's/^--precision auto picks \([a-z0-9]*\) here.*; \([^;]*\)$/; --precision auto: \1, \2/p' "$WORK/logs/generate.log")"

exit "$FAILED"
