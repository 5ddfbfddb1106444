#!/usr/bin/env bash
# The CPU demo on the small trained model (docs/demo.md; the model: docs/comparison.md):
#   the shipped model (models/demo-moe; RETRAIN=1 trains one into runs/trained instead, which
#   depends on the machine) -> score experts with 2 torchrun ranks (expert parallel 2) on its
#   FP8 checkpoint -> keep KEEP=6 of its 16 experts per layer for "math" -> export a pruned FP8 HF
#   checkpoint -> perplexity of full vs pruned on held-out code, prose and math -> the same for a
#   model pruned for code -> routing drift. The README shows this script's output on the shipped model.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/demo}
if [[ "${RETRAIN:-0}" == 1 ]]; then TRAINED=${TRAINED:-runs/trained}; else TRAINED=${TRAINED:-models/demo-moe}; fi
KEEP=${KEEP:-6}
rm -rf "$OUT"; mkdir -p "$OUT/logs"

# Megatron's warnings go to a log; on failure its tail is shown.
quiet() {
  local log="$OUT/logs/$1.log"; shift
  "$@" 2>"$log" || { echo "error: failed ($*); last lines of $log:" >&2; tail -n 20 "$log" >&2; return 1; }
}

if [[ -f "$TRAINED/hf-fp8/config.json" && -f "$TRAINED/report.json" ]]; then
  echo "== 1. reusing the trained model in $TRAINED (RETRAIN=1 trains a new one into runs/trained)"
elif [[ "${RETRAIN:-0}" != 1 && "$TRAINED" == models/demo-moe ]]; then
  echo "error: the shipped model $TRAINED is missing (a partial checkout?); RETRAIN=1 trains one" >&2
  exit 1
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

echo "== 5. the other direction: keep $KEEP experts by EASY-EP score on code instead; what does math lose?"
python converters/export_pruned.py --hf-checkpoint "$TRAINED/hf-fp8" --scores "$OUT/scores" \
  --output "$OUT/pruned_code" --keep "$KEEP" --metric easyep --domains code \
  --group-policy collapse --target-ep 2 >"$OUT/logs/export_code.log"
echo "-- pruned for code ($OUT/pruned_code, $KEEP of $EXPERTS experts)"
quiet eval_pruned_code torchrun --standalone --nproc-per-node 2 launch/evaluate.py \
  --hf-checkpoint "$OUT/pruned_code" "${HELDOUT[@]}" --expert-parallel 2 \
  --json "$OUT/eval_pruned_code.json" --baseline "$OUT/eval_full.json"

echo "== 6. routing drift of the math-pruned model on held-out math (per layer)"
quiet drift torchrun --standalone --nproc-per-node 2 launch/routing_drift.py \
  --hf-checkpoint "$TRAINED/hf-fp8" --pruned "$OUT/pruned_math" --demos "$D/math_heldout.jsonl:math" \
  --expert-parallel 2
echo "== done: scores in $OUT/scores, pruned checkpoint in $OUT/pruned_math"
