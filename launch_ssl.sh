#!/usr/bin/env bash
# Single-machine launcher of dinocell training.
#   ./launch_ssl.sh                                   set up .venv if needed, then train the demo (configs/train/demo.yaml)
#   ./launch_ssl.sh CONFIG.yaml [--output-dir D] [--no-resume] [key=value ...]
# One process per visible GPU through torchrun (CUDA_VISIBLE_DEVICES, else `nvidia-smi -L`), or one CPU process.
# Re-running the same command resumes from the newest complete checkpoint in the output directory.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DEMO_CONFIG="$ROOT/configs/train/demo.yaml"

usage() {
    cat <<USAGE
usage: ./launch_ssl.sh [CONFIG.yaml] [--output-dir DIR] [--no-resume] [key=value ...]

Without a config file, trains the demo ($DEMO_CONFIG: a small ViT on synthetic 5-channel Cell Painting
data, a few minutes on CPU) and prints k-NN accuracy before and after training.

  CONFIG.yaml        training recipe, e.g. configs/train/dinov3_vits8_jump_s3_multiview.yaml, or
                     configs/train/simclr_resnet18_demo.yaml (the SimCLR demo: a ResNet-18, same data, a few minutes)
  --output-dir DIR   where config.yaml, logs/, ckpt/, eval/ and training_metrics.json go (default: train.output_dir)
  --no-resume        start from scratch even if DIR/ckpt/ holds checkpoints
  key=value          config overrides, e.g. train.batch_size_per_gpu=32 'train.dataset_path=SyntheticCellPainting'

Processes: one per visible GPU via torchrun (GPUs from CUDA_VISIBLE_DEVICES, else nvidia-smi -L), one CPU process
without GPUs. Multi-node runs: see docs/distributed.md. Set-up: scripts/setup_env.sh (creates .venv on first use).
USAGE
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
    echo "launch_ssl.sh: config file '$config' does not exist" >&2
    exit 2
fi

# "" = no extras; without an argument `source` would hand this script's own arguments to setup_env.sh
source "$ROOT/scripts/setup_env.sh" ""

if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    n_gpus=$(awk -F, '{print NF}' <<< "$CUDA_VISIBLE_DEVICES")
elif command -v nvidia-smi > /dev/null 2>&1; then
    n_gpus=$(nvidia-smi -L 2> /dev/null | grep -c '^GPU' || true)
else
    n_gpus=0
fi

# no cd: relative config paths, --output-dir and train.output_dir stay relative to where the user runs this
if [ "$n_gpus" -ge 1 ]; then
    echo "[launch_ssl] $n_gpus GPU(s): torchrun --nproc_per_node=$n_gpus, config $config" >&2
    exec python -m torch.distributed.run --standalone --nproc_per_node="$n_gpus" -m dinocell.train \
        --config-file "$config" "$@"
fi
echo "[launch_ssl] no GPU visible: one CPU process, config $config" >&2
exec python -m dinocell.train --config-file "$config" "$@"
