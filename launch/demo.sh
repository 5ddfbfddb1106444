#!/usr/bin/env bash
# The CPU demo on the small trained model (see README "A small trained model"):
#   train it (or reuse TRAINED) -> score experts with 2 torchrun ranks (expert parallel 2) on its
#   FP8 checkpoint -> keep KEEP=6 of its 16 experts per layer for "math" -> export a pruned FP8 HF
#   checkpoint -> perplexity of full vs pruned on held-out code, prose and math -> routing drift.
# Expected: math's perplexity moves least; code's and prose's rise more (numbers in the README).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/demo}
TRAINED=${TRAINED:-runs/trained}
KEEP=${KEEP:-6}
rm -rf "$OUT"; mkdir -p "$OUT/logs"

# Megatron's warnings go to a log; on failure its tail is shown.
quiet() {
  local log="$OUT/logs/$1.log"; shift
  "$@" 2>"$log" || { echo "error: failed ($*); last lines of $log:" >&2; tail -n 20 "$log" >&2; return 1; }
}

if [[ -f "$TRAINED/hf-fp8/config.json" && -f "$TRAINED/report.json" ]]; then
  echo "== 1. reusing the trained model in $TRAINED (delete it to train again)"
else
  echo "== 1. train the small DeepSeek-V3-architecture MoE on offline text (seed 0, 340 steps, ~7 min)"
  python launch/train_tiny.py --output "$TRAINED" --seed 0 --steps 340 --threads 1 --fp8
fi
D="$TRAINED/demos"
EXPERTS=$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["n_routed_experts"])' \
  "$TRAINED/hf-fp8/config.json")
HELDOUT=(--demos "$D/code_heldout.jsonl:code" --demos "$D/prose_heldout.jsonl:prose"
         --demos "$D/math_heldout.jsonl:math")

echo "== 2. score experts on the FP8 checkpoint: torchrun, 2 ranks, expert parallel 2, alltoall"
torchrun --standalone --nproc-per-node 2 launch/score.py --hf-checkpoint "$TRAINED/hf-fp8" \
  --demos "$D/code_calib.jsonl:code" --demos "$D/prose_calib.jsonl:prose" \
  --demos "$D/math_calib.jsonl:math" --expert-parallel 2 --dispatcher alltoall --output "$OUT/scores"

echo "== 3. keep $KEEP of $EXPERTS experts per layer by EASY-EP score on math; export a pruned FP8 checkpoint"
python converters/export_pruned.py --hf-checkpoint "$TRAINED/hf-fp8" --scores "$OUT/scores" \
  --output "$OUT/pruned_math" --keep "$KEEP" --metric easyep --domains math \
  --group-policy collapse --target-ep 2

echo "== 4. held-out perplexity per domain: full model, then the math-pruned one against it"
echo "-- full ($TRAINED/hf-fp8)"
quiet eval_full torchrun --standalone --nproc-per-node 2 launch/evaluate.py \
  --hf-checkpoint "$TRAINED/hf-fp8" "${HELDOUT[@]}" --expert-parallel 2 --json "$OUT/eval_full.json"
echo "-- pruned for math ($OUT/pruned_math, $KEEP of $EXPERTS experts)"
quiet eval_pruned torchrun --standalone --nproc-per-node 2 launch/evaluate.py \
  --hf-checkpoint "$OUT/pruned_math" "${HELDOUT[@]}" --expert-parallel 2 \
  --json "$OUT/eval_pruned_math.json" --baseline "$OUT/eval_full.json"

echo "== 5. routing drift of the pruned model on held-out math (per layer)"
quiet drift torchrun --standalone --nproc-per-node 2 launch/routing_drift.py \
  --hf-checkpoint "$TRAINED/hf-fp8" --pruned "$OUT/pruned_math" --demos "$D/math_heldout.jsonl:math" \
  --expert-parallel 2
echo "== done: scores in $OUT/scores, pruned checkpoint in $OUT/pruned_math"
