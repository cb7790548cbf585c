#!/usr/bin/env bash
# Single node: `bash examples/train_torchrun.sh configs/llama3_8b_packed_sft.yaml [key.sub=value ...]`, from any
# directory (relative paths resolve there) and without activating an environment (see find_megapack.sh).
# NPROC defaults to the number of GPUs (2 CPU processes without a GPU). With configs/tiny_cpu.yaml and missing
# inputs, it first builds the tiny model and the demo shards (under ./runs, where the config expects them), each only
# when the run still uses it (not when `model.hf_dir=…` / `data.path=…` / `data.blend=…` is overridden).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/find_megapack.sh"
config="${1:-$MEGAPACK_ROOT/configs/tiny_cpu.yaml}"
shift || true
if [[ -z "${NPROC:-}" ]]; then
    NPROC=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() or 2)")
fi
overridden() {  # whether an override among the arguments sets one of the given keys
    local arg key
    for arg in "${@:2}"; do for key in $1; do [[ "$arg" == "$key="* ]] && return 0; done; done
    return 1
}
if [[ "$(basename "$config")" == "tiny_cpu.yaml" ]]; then
    overridden "model.hf_dir" "$@" || [[ -f runs/tiny-hf/config.json ]] || "$PYTHON" -c \
        "from megapack.model.tiny_checkpoint import write_tiny_checkpoint as w; w('runs/tiny-hf')"
    if ! overridden "data.path data.blend" "$@" && [[ ! -f runs/demo-shards/meta.json ]]; then
        data=$("$PYTHON" -c "from megapack.assets import fetch; print(fetch('llamafactory-data'))")
        tok=$("$PYTHON" -c "from megapack.assets import fetch; print(fetch('llama3-tokenizer'))")
        megapack preprocess --dataset alpaca_en_demo --dataset-dir "$data" --tokenizer-model "$tok" \
            --seq-length 512 --packing bfd --val-fraction 0.05 --output-dir runs/demo-shards --no-progress
    fi
fi
# validate config, shards and layout before starting any process group
megapack train --config "$config" --check --world-size "$NPROC" "$@" >/dev/null
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" CUDA_DEVICE_MAX_CONNECTIONS=1
# torchrun's agent; a failed rank ends the output with one line (the rank, its error, the exit code), no traceback
exec megapack launch --nproc-per-node "$NPROC" megapack train --config "$config" "$@"
