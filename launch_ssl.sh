#!/usr/bin/env bash
# Launcher of dinocell training on one machine, or on each of several (multi-node torchrun).
#   ./launch_ssl.sh                                   set up .venv if needed, then train the demo (configs/train/demo.yaml)
#   ./launch_ssl.sh CONFIG.yaml [--output-dir D] [--no-resume] [key=value ...]
#   ./launch_ssl.sh CONFIG.yaml --nnodes N --rdzv-endpoint HOST:PORT [--node-rank R] ...   (the same on every node)
# One process per visible GPU through torchrun (CUDA_VISIBLE_DEVICES, else `nvidia-smi -L`), or one CPU process.
# Re-running the same command resumes from the newest complete checkpoint in the output directory.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DEMO_CONFIG="$ROOT/configs/train/demo.yaml"
# what resumes this run (named by the trainer when it is stopped): this command again, without --no-resume
resume_args=()
for arg in "$@"; do [ "$arg" = --no-resume ] || resume_args+=("$arg"); done
DINOCELL_LAUNCH_COMMAND="$(printf '%q ' "$0" ${resume_args[@]+"${resume_args[@]}"})"
export DINOCELL_LAUNCH_COMMAND="${DINOCELL_LAUNCH_COMMAND% }"

usage() {
    cat <<USAGE
usage: ./launch_ssl.sh [CONFIG.yaml] [--output-dir DIR] [--no-resume] [key=value ...]
                       [--nnodes N --rdzv-endpoint HOST:PORT [--node-rank R]] [--dry-run]

Without a config file, trains the demo ($DEMO_CONFIG: a small ViT on synthetic 5-channel Cell Painting
data, a few minutes on CPU) and prints k-NN accuracy before and after training.

  CONFIG.yaml        training recipe, e.g. configs/train/dinov3_vits8_jump_s3_multiview.yaml, or
                     configs/train/simclr_resnet18_demo.yaml (the SimCLR demo: a ResNet-18, same data, a few minutes)
  --output-dir DIR   where config.yaml, logs/, ckpt/, eval/ and training_metrics.json go (default: train.output_dir)
  --no-resume        start from scratch even if DIR/ckpt/ holds checkpoints
  key=value          config overrides, e.g. train.batch_size_per_gpu=32 'train.dataset_path=SyntheticCellPainting'

Several machines (run the same command on each; DIR on storage they all see):
  --nnodes N                 number of machines
  --rdzv-endpoint HOST:PORT  where the processes meet: a host all machines reach (usually the first) and a free port;
                             c10d rendezvous, node ranks assigned as the machines join
  --node-rank R              optional: fixed node ranks 0..N-1 instead (static rendezvous; node 0 must be HOST)
  --dry-run                  print the command that would run on this machine, and exit

Processes: one per visible GPU via torchrun (GPUs from CUDA_VISIBLE_DEVICES, else nvidia-smi -L; CUDA_VISIBLE_DEVICES=
hides them all), one CPU process without GPUs (one torchrun process per machine on multi-node CPU runs).
Example, 2 machines x 8 GPUs:
  ./launch_ssl.sh configs/train/dinov3_vits8_jump_s3_multiview.yaml --output-dir /shared/runs/vits8 \\
      --nnodes 2 --rdzv-endpoint node01:29500
More (Slurm, Kubernetes, NCCL settings): docs/distributed.md. Set-up: scripts/setup_env.sh (creates .venv on first use).
USAGE
}

fail() {
    echo "launch_ssl.sh: $1" >&2
    exit 2
}

config="$DEMO_CONFIG"
case "${1:-}" in
    -h|--help) usage; exit 0 ;;
    *.yaml|*.yml) config="$1"; shift ;;
    "") ;;
    -*|*=*) ;;  # options or overrides for the demo
    *) echo "launch_ssl.sh: '$1' is not a YAML config file, an option or a key=value override" >&2; usage >&2; exit 2 ;;
esac
if [ ! -f "$config" ]; then
    fail "config file '$config' does not exist"
fi

nnodes=1 node_rank="" rdzv_endpoint="" dry_run=0
train_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --nnodes|--node-rank|--rdzv-endpoint)
            [ $# -ge 2 ] && [[ "$2" != -* ]] || fail "$1 needs a value"
            set -- "$1=$2" "${@:3}" ;;
        --nnodes=*) nnodes="${1#*=}"; shift ;;
        --node-rank=*) node_rank="${1#*=}"; shift ;;
        --rdzv-endpoint=*) rdzv_endpoint="${1#*=}"; shift ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) train_args+=("$1"); shift ;;
    esac
done
[[ "$nnodes" =~ ^[1-9][0-9]*$ ]] || fail "--nnodes '$nnodes': expected a whole number >= 1"
if [ "$nnodes" -gt 1 ]; then
    [[ "$rdzv_endpoint" =~ ^[^:]+:[0-9]+$ ]] ||
        fail "--rdzv-endpoint '$rdzv_endpoint': with --nnodes $nnodes, give HOST:PORT of the rendezvous (e.g. node01:29500)"
fi
if [ -n "$node_rank" ]; then
    [ "$nnodes" -gt 1 ] || fail "--node-rank needs --nnodes > 1"
    { [[ "$node_rank" =~ ^[0-9]+$ ]] && [ "$node_rank" -lt "$nnodes" ]; } ||
        fail "--node-rank '$node_rank': expected 0..$((nnodes - 1))"
fi

if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
    n_gpus=$(awk -F, '{print NF}' <<< "$CUDA_VISIBLE_DEVICES")
elif command -v nvidia-smi > /dev/null 2>&1; then
    n_gpus=$(nvidia-smi -L 2> /dev/null | grep -c '^GPU' || true)
else
    n_gpus=0
fi

train=(-m dinocell.train --config-file "$config" "${train_args[@]}")
# On SIGTERM the run writes a checkpoint at the next iteration, then stops; torchrun waits this long for it before it
# kills the processes (its own default: 30 s, too short for a large model's checkpoint)
torchrun=(env TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}" python -m torch.distributed.run)
if [ "$nnodes" -gt 1 ]; then
    per_node=$(( n_gpus > 0 ? n_gpus : 1 ))
    if [ -n "$node_rank" ]; then
        rendezvous=(--node-rank="$node_rank" --master-addr="${rdzv_endpoint%:*}" --master-port="${rdzv_endpoint##*:}")
    else
        rendezvous=(--rdzv-backend=c10d --rdzv-endpoint="$rdzv_endpoint" --rdzv-id=dinocell)
    fi
    command=("${torchrun[@]}" --nnodes="$nnodes" --nproc-per-node="$per_node" "${rendezvous[@]}" "${train[@]}")
    what="node ${node_rank:-?} of $nnodes, $per_node process(es) here ($n_gpus GPU(s)), rendezvous $rdzv_endpoint"
elif [ "$n_gpus" -ge 1 ]; then
    command=("${torchrun[@]}" --standalone --nproc-per-node="$n_gpus" "${train[@]}")
    what="$n_gpus GPU(s): torchrun --nproc-per-node=$n_gpus"
else
    command=(python "${train[@]}")
    what="no GPU visible: one CPU process"
fi
if [ "$dry_run" = 1 ]; then
    printf '%q ' "${command[@]}"
    echo
    exit 0
fi

# "" = no extras; without an argument `source` would hand this script's own arguments to setup_env.sh
source "$ROOT/scripts/setup_env.sh" ""
# no cd: relative config paths, --output-dir and train.output_dir stay relative to where the user runs this
echo "[launch_ssl] $what, config $config" >&2
exec "${command[@]}"
