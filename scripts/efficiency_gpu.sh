#!/usr/bin/env bash
# The efficiency report on one GPU (80 GB): a random 1.5B-shape 25%-full GDN hybrid beside its all-full Llama, at 8k,
# 32k, 128k and 1M tokens, batch 1 and the all-full model's largest batch (at 32k and 128k), eager generate and
# compiled static-cache decode, Triton kernels on; then a profile of the hybrid at 128k (breakdown.md).
# Contexts above 128k are prefilled in chunks of 128k tokens; the all-full model at 1M is recorded as out of memory.
# Usage: scripts/efficiency_gpu.sh OUTPUT_DIR [BENCH OPTIONS...]   (e.g. --plugin-full). On an H100 a compiled decode
# graph takes ~30 s to build: with --plugin-full, 8k and 32k take about 7 minutes, 128k about 6 and 1M about 2.5.
# Runs of other contexts join into one report with `hf-effattn bench --merge RUN_DIR ... --output DIR`.
# Override with CONTEXTS, LARGEST_BATCH, EAGER_MAX_CONTEXT (eager generate is skipped above it), BREAKDOWN,
# PYTHON (default python3); an empty LARGEST_BATCH or BREAKDOWN leaves that part out.
set -euo pipefail
out=${1:?usage: scripts/efficiency_gpu.sh OUTPUT_DIR [BENCH OPTIONS...]}
shift
python=${PYTHON:-python3}
contexts=${CONTEXTS:-8192,32768,131072,1048576}
largest=${LARGEST_BATCH-32768,131072}
breakdown=${BREAKDOWN-131072}
eager_max=${EAGER_MAX_CONTEXT:-1048576}
options=("$@")
[[ -n $largest ]] && options+=(--largest-batch "$largest")
[[ -n $breakdown ]] && options+=(--breakdown "$breakdown")
mkdir -p "$out"
# 1M-token caches are re-allocated chunk by chunk: expandable segments keep the allocator from fragmenting
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export PYTHONUNBUFFERED=1
start=$(date +%s)
"$python" -m hf_effattn.cli bench --shape 1.5b --contexts "$contexts" --batches 1 --prefill-chunk 131072 \
  --eager-max-context "$eager_max" "${options[@]}" --output "$out" \
  2>&1 | tee "$out/bench.log"
echo "efficiency report: $out/efficiency.md, $out/breakdown.md ($(( $(date +%s) - start )) s)"
