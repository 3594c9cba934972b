#!/usr/bin/env bash
# On one GPU: convert the teacher with the default recipe (if OUTPUT_DIR/hybrid does not exist yet), evaluate the
# hybrid against its teacher with the whole offline task pack at 1k-4k, then time a random 1.5B-shape 25%-full GDN
# hybrid against its all-full model. Each stage can run alone: STAGES="eval bench" scripts/evaluate_gpu.sh ...
# Usage: scripts/evaluate_gpu.sh OUTPUT_DIR [TEACHER]
set -euo pipefail
out=${1:?usage: scripts/evaluate_gpu.sh OUTPUT_DIR [TEACHER]}
teacher=${2:-embedded}
stages=${STAGES:-convert eval bench}
cli=${HF_EFFATTN_CLI:-hf-effattn}
tasks=passkey,niah_single,niah_multikey,niah_uuid,niah_multivalue,niah_multiquery,vt,cwe,fwe,mqar,ppl
mkdir -p "$out"
for stage in $stages; do
  case $stage in
    convert) [[ -f "$out/hybrid/config.json" ]] || "$cli" convert --teacher "$teacher" --output "$out/hybrid" \
               --precision fp32 --max-new-tokens 0 ;;
    eval) "$cli" eval "$out/hybrid" --teacher "$teacher" --tasks "$tasks" --lengths 1024,2048,4096 \
            --num-samples 16 --batch-size 16 --max-gen-toks 48 --device cuda --output "$out/eval" ;;
    bench) "$cli" bench --shape 1.5b --contexts "${BENCH_CONTEXTS:-8192,32768,131072}" \
             --batches "${BENCH_BATCHES:-1}" --output "$out/bench" ;;
    *) echo "unknown stage $stage (expected convert, eval or bench)" >&2; exit 2 ;;
  esac
done
