#!/usr/bin/env bash
# Every GPU check of issue 10 in one go, one log: correctness of the speed paths (scripts/gpu_check.py: list-forward,
# bf16, compiled blocks, activation checkpointing, fused AdamW, GPU augmentations, SDPA backends), then the full-step
# benchmarks (scripts/bench_train.py: ViT-S/8 batch 64 JUMP recipe eager / compiled / with activation checkpointing,
# with a profile of the top CUDA ops; ViT-L/16 batch 32 and 64). About 8 minutes on one H100 or H200.
#
# Usage:
#   bash scripts/gpu_check.sh --fetch-wheels   # on a machine with pip and the project venv: download the pure-Python
#                                              # wheels a bare GPU box lacks (omegaconf, antlr4, boto3, botocore,
#                                              # s3transfer, jmespath; versions of this environment) into .whl/
#   bash scripts/gpu_check.sh                  # on the GPU machine; installs .whl/*.whl into /tmp/site if present
#   bash scripts/gpu_check.sh --tiny           # CPU smoke test of this script: tiny shapes, --device cpu
# With the workplace's device tool: run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=600).
# The log is $OUT/gpu_check.log when $OUT is set (the device tool's output folder), else ./gpu_check.log.
# Environment: PYTHON (default python3), PEAK_TFLOPS (default 989, H100/H200 dense bf16) for the MFU column.
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

TINY=0
[ "${1:-}" = "--tiny" ] && TINY=1
LOG="${OUT:-$PWD}/gpu_check.log"
START=$SECONDS
stamp() { echo "### [$((SECONDS - START)) s] $*"; }

# bench LABEL ARGS...: one bench_train.py run in its own process, bounded so one hang cannot eat the lease
bench() {
    local label="$1"
    shift
    stamp "benchmark: $label"
    timeout "${BENCH_TIMEOUT:-240}" "$PYTHON" scripts/bench_train.py "$@" || { echo "### FAILED ($?): $label"; return 1; }
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

    stamp "correctness (scripts/gpu_check.py)"
    if [ "$TINY" = 1 ]; then
        "$PYTHON" scripts/gpu_check.py --device cpu --tiny || failed=1
    else
        "$PYTHON" scripts/gpu_check.py --device cuda || failed=1
    fi

    local recipe=configs/train/dinov3_vits8_jump_s3_multiview.yaml
    if [ "$TINY" = 1 ]; then
        local small=(--arch vit_test --patch-sizes 8 --batch-size 2 --iters 1 --warmup 1 --device cpu --threads 2
                     crops.global_crops_size=32 crops.local_crops_size=16 crops.local_crops_number=2
                     dino.head_n_prototypes=128 ibot.head_n_prototypes=128 dino.head_hidden_dim=64
                     ibot.head_hidden_dim=64)
        bench "tiny eager + profile" "${small[@]}" --profile 1 || failed=1
        bench "tiny compiled + activation checkpointing" "${small[@]}" --compile --activation-checkpointing || failed=1
    else
        local peak="${PEAK_TFLOPS:-989}"
        local vits8=(--config-file "$recipe" --patch-sizes 8 --batch-size 64 --iters 10 --warmup 3 --peak-tflops "$peak"
                     student.pretrained_weights=null)
        local vitl16=(--arch vit_large --patch-sizes 16 --iters 10 --warmup 3 --peak-tflops "$peak" student.in_chans=3)
        bench "ViT-S/8 bs64 JUMP recipe, eager (+ profile of 1 step)" "${vits8[@]}" --profile 1 || failed=1
        bench "ViT-S/8 bs64 JUMP recipe, compiled (+ profile of 1 step)" "${vits8[@]}" --compile --profile 1 || failed=1
        bench "ViT-S/8 bs64 JUMP recipe, compiled + activation checkpointing" "${vits8[@]}" --compile \
            --activation-checkpointing || failed=1
        bench "ViT-S/8 bs64 JUMP recipe, eager + activation checkpointing" "${vits8[@]}" \
            --activation-checkpointing || failed=1
        bench "ViT-L/16 bs32 default config, compiled" "${vitl16[@]}" --batch-size 32 --compile || failed=1
        bench "ViT-L/16 bs64 default config, compiled + activation checkpointing" "${vitl16[@]}" --batch-size 64 \
            --compile --activation-checkpointing || failed=1
    fi
    stamp "done: $([ "$failed" = 0 ] && echo 'every check passed and every benchmark ran' || echo 'FAILURES above')"
    return "$failed"
}

checks 2>&1 | tee "$LOG"
status="${PIPESTATUS[0]}"
echo "=== summary (full log: $LOG)"
grep -E '^\[(PASS|FAIL)\]|^patch |^### |^# summary' "$LOG"
exit "$status"
