#!/usr/bin/env bash
# The CPU demo, end to end on a tiny DeepSeek-V3-shaped checkpoint it generates:
#   checkpoint -> score experts with 2 torchrun ranks (expert parallel 2) -> prune to half the
#   experts for "math" -> export a pruned HF checkpoint -> evaluate full vs pruned.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/demo}
rm -rf "$OUT"; mkdir -p "$OUT"

echo "== 1. a tiny FP8 DeepSeek-V3-shaped checkpoint (random weights) and two demo domains"
python converters/make_tiny_checkpoint.py --output "$OUT/ckpt" --fp8 --set weight_block_size='[32,32]'
python -m megatron_easyep.demo_data "$OUT/demos"

echo "== 2. score experts: torchrun, 2 ranks, expert parallel 2, alltoall dispatcher"
torchrun --standalone --nproc-per-node 2 launch/score.py --hf-checkpoint "$OUT/ckpt" \
  --demos "$OUT/demos/math.jsonl:math" --demos "$OUT/demos/code.jsonl:code" \
  --expert-parallel 2 --dispatcher alltoall --output "$OUT/scores"

echo "== 3. keep 8 of 16 experts per layer by EASY-EP score on math (2 per routing group)"
python converters/export_pruned.py --hf-checkpoint "$OUT/ckpt" --scores "$OUT/scores" \
  --output "$OUT/pruned_math" --keep 8 --metric easyep --domains math \
  --group-policy equal-per-group --target-ep 2

echo "== 4. evaluate full and pruned models on held-out demos"
for model in ckpt pruned_math; do
  echo "-- $model"
  torchrun --standalone --nproc-per-node 2 launch/evaluate.py --hf-checkpoint "$OUT/$model" \
    --demos "$OUT/demos/math_heldout.jsonl:math" --demos "$OUT/demos/code_heldout.jsonl:code" \
    --expert-parallel 2 2>/dev/null
done
echo "== 5. routing drift of the pruned model on held-out math (per layer)"
torchrun --standalone --nproc-per-node 2 launch/routing_drift.py --hf-checkpoint "$OUT/ckpt" \
  --pruned "$OUT/pruned_math" --demos "$OUT/demos/math_heldout.jsonl:math" --expert-parallel 2 2>/dev/null
echo "== done: scores in $OUT/scores, pruned checkpoint in $OUT/pruned_math"
