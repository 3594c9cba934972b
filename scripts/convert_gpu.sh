#!/usr/bin/env bash
# The longer conversion recipe (`--preset gpu`: bf16, batch 4, 1k-2k tokens) on one GPU, then a pure-linear
# conversion (no full-attention layer) with the same recipe for comparison. Each run resumes where it stopped
# when rerun with the same arguments.
# Usage: scripts/convert_gpu.sh OUTPUT_DIR [TEACHER] [extra hf-effattn convert options...]
set -euo pipefail
out=${1:?usage: scripts/convert_gpu.sh OUTPUT_DIR [TEACHER] [convert options...]}
teacher=${2:-embedded}
shift $(( $# >= 2 ? 2 : 1 ))
cli=${HF_EFFATTN_CLI:-hf-effattn}
mkdir -p "$out"
"$cli" convert --preset gpu --teacher "$teacher" --output "$out/hybrid-25" --keep-work \
  --max-new-tokens 0 "$@"
"$cli" convert --preset gpu --teacher "$teacher" --output "$out/linear-0" --full-share 0 \
  --keep-work --max-new-tokens 0 "$@"
