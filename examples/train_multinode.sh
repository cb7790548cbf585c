#!/usr/bin/env bash
# Multi-node with torchrun: run this on every node with the same MASTER_ADDR (the first node) and NNODES, e.g.
#   MASTER_ADDR=node001 NNODES=4 bash examples/train_multinode.sh configs/llama3_70b_packed_sft.yaml \
#       data.path=/data/shards model.hf_dir=/ckpt/Meta-Llama-3-70B
# (no apostrophes inside "${VAR:?message}": bash 5.2 reads them as an unterminated quote)
# Each node starts one process per GPU; torchrun's c10d rendezvous assigns the ranks.
# From any directory, without activating an environment (see find_megapack.sh); relative paths resolve there.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/find_megapack.sh"
config="${1:?usage: bash examples/train_multinode.sh CONFIG [key.sub=value ...]}"
shift
: "${MASTER_ADDR:?set MASTER_ADDR to the address of the first node}"
: "${NNODES:?set NNODES to the number of nodes}"
MASTER_PORT="${MASTER_PORT:-29500}"
NPROC="${NPROC:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')}"
if [[ "$NPROC" -lt 1 ]]; then
    echo "error: no GPU visible on $(hostname); set NPROC to the number of processes per node" >&2
    exit 1
fi
# validate config, shards and layout on every node before the rendezvous (one line naming the key on error)
megapack train --config "$config" --check --world-size "$((NNODES * NPROC))" "$@" >/dev/null
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}" CUDA_DEVICE_MAX_CONNECTIONS=1
# torchrun's agent (c10d rendezvous); a failed rank of this node ends its output with one line naming it
exec megapack launch --nnodes "$NNODES" --nproc-per-node "$NPROC" --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" \
    --rdzv-id "${RDZV_ID:-megapack}" megapack train --config "$config" "$@"
