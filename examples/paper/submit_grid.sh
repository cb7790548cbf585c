#!/usr/bin/env bash
# Submit the packing study's 24 trainings (configs/paper/*.yaml) with examples/train.sbatch (4 nodes x 8 GPUs),
# each checked first on this node by `megapack train --check` (config, shards, layout and the memory plan on
# GPU_MEMORY_GB GPUs): a run that cannot start fails here, not after hours in the queue.
#
#   MODEL_8B=/models/Meta-Llama-3-8B MODEL_70B=/models/Meta-Llama-3-70B bash examples/paper/submit_grid.sh
#   ... bash examples/paper/submit_grid.sh llama3-8b_tulu      # only the configs whose name contains this
#
# Run it from the repository root after examples/paper/preprocess_grid.sbatch has written shards/paper/.
# Every check runs before the first submission; DRY_RUN=1 prints the sbatch commands instead of running them.
set -euo pipefail
: "${MODEL_8B:?set MODEL_8B to the Meta-Llama-3-8B checkpoint directory}"
: "${MODEL_70B:?set MODEL_70B to the Meta-Llama-3-70B checkpoint directory}"
GPU_MEMORY_GB="${GPU_MEMORY_GB:-80}"
WORLD_SIZE=32  # examples/train.sbatch: 4 nodes x 8 tasks
shopt -s nullglob
configs=(configs/paper/*"${1:-}"*.yaml)
(( ${#configs[@]} )) || { echo "error: no configs/paper/*${1:-}*.yaml (run from the repository root)" >&2; exit 1; }
model_of() {
  case "$(basename "$1")" in
    llama3-8b_*) echo "$MODEL_8B" ;;
    llama3-70b_*) echo "$MODEL_70B" ;;
    *) echo "error: $1: no model for this name" >&2; return 1 ;;
  esac
}
for config in "${configs[@]}"; do
  megapack train --config "$config" "model.hf_dir=$(model_of "$config")" --check --world-size "$WORLD_SIZE" \
      --gpu-memory-gb "$GPU_MEMORY_GB" > /dev/null
  echo "checked $config"
done
mkdir -p logs
for config in "${configs[@]}"; do
  cmd=(sbatch --job-name="paper-$(basename "$config" .yaml)" examples/train.sbatch "$config"
       "model.hf_dir=$(model_of "$config")")
  if [[ -n "${DRY_RUN:-}" ]]; then echo "${cmd[*]}"; else "${cmd[@]}"; fi
done
