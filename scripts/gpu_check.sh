#!/usr/bin/env bash
# Every GPU check of issue 10 in one go, one log: correctness of the speed paths (scripts/gpu_check.py: list-forward,
# bf16, compiled blocks, activation checkpointing, fused AdamW, GPU augmentations, SDPA backends, bf16 heads, the
# sync-free step, the fused found_inf skip, device augmentations through the pipeline, and the trainer's switches),
# then the benchmarks: full step (scripts/bench_train.py: ViT-S/8 batch 64 JUMP recipe eager / compiled / compiled with
# activation checkpointing, with a profile of the top CUDA ops; ViT-L/16 batch 32 and 64), and `dinocell train`
# end to end on a local stand-in for a JUMP mirror (1080 px fields, scripts/synthetic_jump_folder.py) with the
# recipe's workers, CPU and GPU augmentations (s/iter and data_wait_share). Sections run in order of importance
# within a time budget (BUDGET seconds, default 480 = 8 minutes); one that would not fit is skipped and says so.
#
# Usage:
#   bash scripts/gpu_check.sh --fetch-wheels   # on a machine with pip and the project venv: download the pure-Python
#                                              # wheels a bare GPU box lacks (omegaconf, antlr4, boto3, botocore,
#                                              # s3transfer, jmespath; versions of this environment) into .whl/
#   bash scripts/gpu_check.sh                  # on the GPU machine; installs .whl/*.whl into /tmp/site if present
#   bash scripts/gpu_check.sh --tiny           # CPU smoke test of this script: tiny shapes, --device cpu
#   bash scripts/gpu_check.sh --bench-only     # the benchmarks alone (a second call when the first ran out of budget)
# With the workplace's device tool: run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=600).
# The log is $OUT/gpu_check.log when $OUT is set (the device tool's output folder), else ./gpu_check.log.
# Environment: PYTHON (default python3), PEAK_TFLOPS (default 989, H100/H200 dense bf16) for the MFU column, BUDGET.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
WHEELS=(omegaconf antlr4-python3-runtime boto3 botocore s3transfer jmespath)

if [ "${1:-}" = "--fetch-wheels" ]; then
    set -e
    exclude="$(git rev-parse --git-path info/exclude)"
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
    mkdir -p .whl
    for name in "${WHEELS[@]}"; do
        version="$("$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")"
        "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "$name==$version"
    done
    ls -l .whl
    exit 0
fi

TINY=0 BENCH_ONLY=0
for arg in "$@"; do
    case "$arg" in
        --tiny) TINY=1 ;;
        --bench-only) BENCH_ONLY=1 ;;
        *) echo "unknown argument '$arg': expected --tiny, --bench-only or --fetch-wheels (alone)"; exit 2 ;;
    esac
done
LOG="${OUT:-$PWD}/gpu_check.log"
mkdir -p "$(dirname "$LOG")"
START=$SECONDS
stamp() { echo "### [$((SECONDS - START)) s] $*"; }

BUDGET="${BUDGET:-$([ "$TINY" = 1 ] && echo 1800 || echo 500)}" SKIPPED=0
# fits SECONDS: whether a section expected to take SECONDS still fits in the budget (else it is skipped, and says so)
fits() {
    local left=$((BUDGET - (SECONDS - START)))
    [ "$1" -le "$left" ] && return 0
    echo "### SKIPPED (expects ~$1 s, $left s of the ${BUDGET} s budget left): $2"
    SKIPPED=$((SKIPPED + 1))
    return 1
}

# bench SECONDS LABEL ARGS...: one bench_train.py run in its own process, bounded so one hang cannot eat the lease
bench() {
    local expect="$1" label="$2"
    shift 2
    fits "$expect" "$label" || return 0
    stamp "benchmark: $label"
    timeout "${BENCH_TIMEOUT:-240}" "$PYTHON" scripts/bench_train.py "$@" || { echo "### FAILED ($?): $label"; return 1; }
}

# e2e SECONDS LABEL FIELDS SIZE [--no-gpu-augmentations]: `python -m dinocell.train` (= dinocell train) with the JUMP
# recipe (its workers and batch) on a local folder of synthetic fields, 4 fields' crop sets per read
# (crops_per_field=4, no field cache), 40 iterations logged every 10; prints s/iter and data_wait_share of the
# windows after the first (which holds worker start-up and compilation).
e2e() {
    local expect="$1" label="$2" fields="$3" size="$4" augment=true
    [ "${5:-}" = "--no-gpu-augmentations" ] && augment=false
    fits "$expect" "$label" || return 0
    stamp "end to end: $label"
    local mirror="${TMPDIR:-/tmp}/dinocell_jump_${size}px" out
    out="$(mktemp -d)"
    [ -f "$mirror/load_data.csv" ] || "$PYTHON" scripts/synthetic_jump_folder.py "$mirror" --fields "$fields" \
        --size "$size" || { echo "### FAILED: writing the synthetic JUMP folder for $label"; return 1; }
    local args=(--config-file configs/train/dinov3_vits8_jump_s3_multiview.yaml --output-dir "$out" --no-resume
                student.pretrained_weights=null
                "train.dataset_path=JUMPCellPaintingMultiView:root=$mirror:crops_per_field=4:cache_size=1"
                train.OFFICIAL_EPOCH_LENGTH=40 optim.epochs=1 optim.warmup_epochs=0 train.log_every=10
                checkpointing.period=1000 evaluation.eval_period_iterations=0 "crops.gpu_augmentations=$augment")
    if [ "$TINY" = 1 ]; then
        args+=(student.arch=vit_test crops.global_crops_size=32 crops.local_crops_size=16 crops.local_crops_number=2
               train.batch_size_per_gpu=4 train.num_workers=1 train.OFFICIAL_EPOCH_LENGTH=6 train.log_every=2
               dino.head_n_prototypes=128 ibot.head_n_prototypes=128)
    else
        args+=(train.compile=true)
    fi
    timeout "${BENCH_TIMEOUT:-240}" "$PYTHON" -m dinocell.train "${args[@]}" > "$out/stdout.txt" 2>&1 \
        || { tail -20 "$out/stdout.txt"; echo "### FAILED: $label"; return 1; }
    grep -E "bottleneck|WARNING" "$out/logs/log.txt" | head -3
    "$PYTHON" - "$out/training_metrics.json" <<'PY'
import json, sys
windows = [json.loads(line) for line in open(sys.argv[1])][1:]  # the first window holds start-up
mean = lambda key: sum(w[key] for w in windows) / len(windows)
print(f"e2e: {mean('iter_time'):.3f} s/iter, data_wait_share {mean('data_wait_share'):.1%}, "
      f"{mean('images_per_s'):.0f} img/s, data_time {mean('data_time'):.3f} s/iter "
      f"(mean of {len(windows)} logging windows after the first)", flush=True)
PY
    rm -rf "$out"
}

checks() {
    local failed=0
    if compgen -G ".whl/*.whl" > /dev/null; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || { echo "installing .whl/*.whl failed"; return 1; }
        export PYTHONPATH="/tmp/site:$PWD"
    else
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
    export PYTHONUNBUFFERED=1
    "$PYTHON" -c "import omegaconf, boto3" 2>/dev/null || {
        echo "omegaconf/boto3 missing: run 'bash scripts/gpu_check.sh --fetch-wheels' where pip works, carry .whl"
        return 1
    }

    stamp "environment"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
    "$PYTHON" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'cuDNN', \
torch.backends.cudnn.version(), 'cuda available', torch.cuda.is_available())"
    git log -1 --format='commit %H %s' 2>/dev/null || true

    if [ "$BENCH_ONLY" = 0 ]; then
        stamp "correctness (scripts/gpu_check.py)"
        if [ "$TINY" = 1 ]; then
            timeout 1200 "$PYTHON" scripts/gpu_check.py --device cpu --tiny || failed=1
        else
            timeout 300 "$PYTHON" scripts/gpu_check.py --device cuda || failed=1
        fi
    fi

    local recipe=configs/train/dinov3_vits8_jump_s3_multiview.yaml
    if [ "$TINY" = 1 ]; then
        local small=(--arch vit_test --patch-sizes 8 --batch-size 2 --iters 1 --warmup 1 --device cpu --threads 2
                     crops.global_crops_size=32 crops.local_crops_size=16 crops.local_crops_number=2
                     dino.head_n_prototypes=128 ibot.head_n_prototypes=128 dino.head_hidden_dim=64
                     ibot.head_hidden_dim=64)
        bench 60 "tiny eager + profile" "${small[@]}" --profile 1 || failed=1
        bench 60 "tiny compiled + activation checkpointing" "${small[@]}" --compile --activation-checkpointing \
            || failed=1
        e2e 60 "tiny end to end, CPU augmentations" 4 64 --no-gpu-augmentations || failed=1
        e2e 60 "tiny end to end, GPU augmentations" 4 64 || failed=1
    else
        local peak="${PEAK_TFLOPS:-989}"
        local vits8=(--config-file "$recipe" --patch-sizes 8 --batch-size 64 --iters 8 --warmup 3 --peak-tflops "$peak"
                     student.pretrained_weights=null)
        local vitl16=(--arch vit_large --patch-sizes 16 --iters 8 --warmup 3 --peak-tflops "$peak" student.in_chans=3)
        # in order of importance: what does not fit in the budget is skipped
        bench 60 "ViT-S/8 bs64 JUMP recipe, eager (+ profile of 1 step)" "${vits8[@]}" --profile 1 || failed=1
        bench 100 "ViT-S/8 bs64 JUMP recipe, compiled (+ profile of 1 step)" "${vits8[@]}" --compile --profile 1 \
            || failed=1
        e2e 90 "dinocell train, JUMP recipe (8 workers), compiled, GPU augmentations" 96 1080 || failed=1
        bench 70 "ViT-S/8 bs64 JUMP recipe, compiled + activation checkpointing" "${vits8[@]}" --compile \
            --activation-checkpointing || failed=1
        e2e 80 "dinocell train, JUMP recipe (8 workers), compiled, CPU augmentations" 96 1080 \
            --no-gpu-augmentations || failed=1
        bench 90 "ViT-L/16 bs32 default config, compiled" "${vitl16[@]}" --batch-size 32 --compile || failed=1
        bench 90 "ViT-L/16 bs64 default config, compiled + activation checkpointing" "${vitl16[@]}" --batch-size 64 \
            --compile --activation-checkpointing || failed=1
        bench 60 "ViT-S/8 bs64 JUMP recipe, eager + activation checkpointing" "${vits8[@]}" \
            --activation-checkpointing || failed=1
    fi
    local ran="every benchmark ran"
    [ "$SKIPPED" = 0 ] || ran="$SKIPPED section(s) skipped for time (### SKIPPED above)"
    stamp "done: $([ "$failed" = 0 ] && echo "every check passed; $ran" || echo "FAILURES above; $ran")"
    return "$failed"
}

checks 2>&1 | tee "$LOG"
status="${PIPESTATUS[0]}"
echo "=== summary (full log: $LOG)"
grep -E '^\[(PASS|FAIL)\]|^patch |^e2e: |^### |^# summary' "$LOG"
exit "$status"
