#!/usr/bin/env bash
# Launch logic shared by score_single_node.sbatch and score_multi_node.sbatch (and usable alone
# inside any SLURM allocation): one torchrun per node via srun, running launch/score.py.
#
#   launch_score.sh [--dry-run] --hf-checkpoint DIR --demos FILE[:DOMAIN] [--demos ...] --output DIR [score.py options]
#
# --dry-run (= EASYEP_DRY_RUN=1) prints the srun and torchrun lines, with the layout worked out as
# below, instead of running them. Every score.py option passes through. What this script adds:
#   * rendezvous: the first host of SLURM_JOB_NODELIST (`scontrol show hostnames` when available,
#     else parsed here) on port EASYEP_MASTER_PORT (default 20000 + SLURM_JOB_ID % 20000);
#     a single node uses torchrun --standalone (a free local port).
#   * processes per node: EASYEP_NPROC_PER_NODE, else SLURM_GPUS_ON_NODE, else
#     SLURM_NTASKS_PER_NODE, else 1.
#   * layout (pipeline x expert parallel): --pipeline-parallel / --expert-parallel if given (or
#     EASYEP_PIPELINE_PARALLEL / EASYEP_EXPERT_PARALLEL); otherwise, when the GPU memory is known
#     (EASYEP_GPU_MEMORY_GIB, else nvidia-smi on the first node), the layout converters/plan.py
#     recommends for this node shape (EASYEP_GPU_MEMORY_GIB=none switches planning off), --max-length (or --micro-batch-tokens) and the weights as
#     the loader holds them (its JSON "recommended": PP, EP and the stage layout; the plan is kept
#     in the log directory); without a memory figure (or with only PP given) EP = gcd(world size /
#     PP, n_routed_experts). Ranks beyond PP x EP are data parallel.
#   * per-rank logs: torchrun --log-dir OUTPUT.logs/job<ID>-restart<N>/node<K>: every rank's
#     stdout/stderr in its own file (<run>/attempt_0/<local rank>/{stdout,stderr}.log, --redirects 3),
#     also echoed to the job log with a "[host rank N]:" prefix (--tee 3).
#   * --resume when SLURM_RESTART_COUNT > 0 or OUTPUT.inprogress exists (a requeued or re-submitted
#     run continues from its last snapshot); a requeued job whose OUTPUT is already complete exits 0.
#   * OUTPUT must be on storage every node sees. Relative paths (--output, --hf-checkpoint,
#     --demos) are taken from SLURM_SUBMIT_DIR (else the current directory).
#
# Environment: EASYEP_PYTHON (default REPO/.venv/bin/python, else python3), EASYEP_MASTER_PORT,
# EASYEP_NPROC_PER_NODE, EASYEP_EXPERT_PARALLEL, EASYEP_PIPELINE_PARALLEL, EASYEP_GPU_MEMORY_GIB,
# EASYEP_LOG_DIR, EASYEP_DRY_RUN=1 (print the
# commands instead of running them), EASYEP_NO_SRUN=1 (run torchrun directly, one node only).
# Without srun on PATH (a local test) the node task runs directly as well.
set -euo pipefail

PLAN_FILES=()
SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
REPO="$(cd "$(dirname "$SELF")/../.." && pwd)"

die() {
  echo "launch_score.sh: error: $*" >&2
  exit 2
}

log() {
  echo "launch_score.sh: $*" >&2
}

# First host of a SLURM node list without scontrol: "gpu[03-05,09],cpu1" -> gpu03,
# "a[1-2]-b[7-8]" -> a1-b7. Only the first top-level entry matters; each bracket expression is
# replaced by the start of its first range (zero padding kept).
first_host() {
  local list="$1" entry="" depth=0 ch i
  for ((i = 0; i < ${#list}; i++)); do
    ch="${list:i:1}"
    if [[ "$ch" == "[" ]]; then
      depth=$((depth + 1))
    elif [[ "$ch" == "]" ]]; then
      depth=$((depth - 1))
    elif [[ "$ch" == "," && $depth -eq 0 ]]; then
      break
    fi
    entry+="$ch"
  done
  local re='^([^[]*)\[([^],-]+)[^]]*\](.*)$'
  while [[ "$entry" =~ $re ]]; do
    entry="${BASH_REMATCH[1]}${BASH_REMATCH[2]}${BASH_REMATCH[3]}"
  done
  printf '%s\n' "$entry"
}

head_node() {
  local nodelist="$1" hosts=()
  if command -v scontrol >/dev/null 2>&1; then
    mapfile -t hosts < <(scontrol show hostnames "$nodelist")
    if ((${#hosts[@]} > 0)); then
      printf '%s\n' "${hosts[0]}"
      return
    fi
  fi
  first_host "$nodelist"
}

gcd() {
  local a="$1" b="$2" t
  while ((b > 0)); do
    t=$((a % b))
    a=$b
    b=$t
  done
  echo "$a"
}

is_positive_int() {
  [[ "$1" =~ ^[0-9]+$ ]] && (("$1" > 0))
}

# ---------------------------------------------------------------------------------------------
# node task: one torchrun on this node (run by srun once per node, or directly)
# ---------------------------------------------------------------------------------------------
node_main() {
  local node_id="${SLURM_NODEID:-0}"
  cd "$EASYEP_WORKDIR"  # relative --demos paths are relative to the submit directory
  local node_log_dir="$EASYEP_RUN_LOG_DIR/node$node_id"
  mkdir -p "$node_log_dir"
  local rdzv=()
  if ((EASYEP_NNODES == 1)); then
    rdzv=(--standalone)
  else
    rdzv=(--nnodes "$EASYEP_NNODES" --rdzv-backend c10d
      --rdzv-endpoint "$EASYEP_HEAD_NODE:$EASYEP_PORT" --rdzv-id "$EASYEP_RDZV_ID")
  fi
  # ${hostname} and ${rank} in single quotes are torchrun's log prefix fields, not bash's
  # shellcheck disable=SC2016
  local cmd=("$EASYEP_PY" -m torch.distributed.run "${rdzv[@]}"
    --nproc-per-node "$EASYEP_NPROC" --max-restarts 0
    --log-dir "$node_log_dir" --redirects 3 --tee 3
    --log-line-prefix-template '[${hostname} rank ${rank}]: '
    "$REPO/launch/score.py")
  # the score.py arguments travel NUL-separated in a file (srun does not pass arrays)
  local args=()
  mapfile -d '' -t args <"$EASYEP_ARGS_FILE"
  cmd+=("${args[@]}")
  if [[ "${EASYEP_DRY_RUN:-0}" == 1 ]]; then
    printf 'node %s:' "$node_id"
    printf ' %q' "${cmd[@]}"
    printf '\n'
    return 0
  fi
  log "node $node_id: $(printf '%q ' "${cmd[@]}")"
  exec "${cmd[@]}"
}

# ---------------------------------------------------------------------------------------------
# job: work out the layout, then one node task per node
# ---------------------------------------------------------------------------------------------
job_main() {
  local args=("$@") output="" ckpt="" ep="" pp="" layout="" tokens="" mbt="" dequant=0 resume=0 i
  for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
      --output) output="${args[i + 1]:-}" ;;
      --output=*) output="${args[i]#--output=}" ;;
      --hf-checkpoint) ckpt="${args[i + 1]:-}" ;;
      --hf-checkpoint=*) ckpt="${args[i]#--hf-checkpoint=}" ;;
      --expert-parallel) ep="${args[i + 1]:-}" ;;
      --expert-parallel=*) ep="${args[i]#--expert-parallel=}" ;;
      --pipeline-parallel) pp="${args[i + 1]:-}" ;;
      --pipeline-parallel=*) pp="${args[i]#--pipeline-parallel=}" ;;
      --pipeline-layout) layout="${args[i + 1]:-}" ;;
      --pipeline-layout=*) layout="${args[i]#--pipeline-layout=}" ;;
      --max-length) tokens="${args[i + 1]:-}" ;;
      --max-length=*) tokens="${args[i]#--max-length=}" ;;
      --micro-batch-tokens) mbt="${args[i + 1]:-}" ;;
      --micro-batch-tokens=*) mbt="${args[i]#--micro-batch-tokens=}" ;;
      --dequantize-at-load) dequant=1 ;;
      --resume) resume=1 ;;
      --config | --config=*) die "pass score.py options on the command line (--config files are not read by this launcher: it needs --output and --hf-checkpoint itself)" ;;
    esac
  done
  [[ -n "$output" ]] || die "--output DIR is required (on storage every node can see)"
  [[ -n "$ckpt" ]] || die "--hf-checkpoint DIR is required"
  local base="${SLURM_SUBMIT_DIR:-$PWD}"
  [[ "$output" == /* ]] || output="$base/$output"
  [[ "$ckpt" == /* ]] || ckpt="$base/$ckpt"
  [[ -f "$ckpt/config.json" ]] || die "$ckpt/config.json does not exist"
  # normalise the paths given on the command line to the absolute ones
  for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
      --output) args[i + 1]="$output" ;;
      --output=*) args[i]="--output=$output" ;;
      --hf-checkpoint) args[i + 1]="$ckpt" ;;
      --hf-checkpoint=*) args[i]="--hf-checkpoint=$ckpt" ;;
    esac
  done

  local py="${EASYEP_PYTHON:-}"
  if [[ -z "$py" ]]; then
    if [[ -x "$REPO/.venv/bin/python" ]]; then py="$REPO/.venv/bin/python"; else py="python3"; fi
  fi

  local nnodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
  local nproc="${EASYEP_NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_NTASKS_PER_NODE:-1}}}"
  nproc="${nproc%%(*}"  # "8(x2)" forms -> 8
  is_positive_int "$nnodes" || die "bad node count '$nnodes' (SLURM_JOB_NUM_NODES)"
  is_positive_int "$nproc" || die "bad processes per node '$nproc' (EASYEP_NPROC_PER_NODE / SLURM_GPUS_ON_NODE / SLURM_NTASKS_PER_NODE)"
  local world=$((nnodes * nproc))

  local experts
  experts="$("$py" -c 'import json, sys; print(json.load(open(sys.argv[1]))["n_routed_experts"])' "$ckpt/config.json")" \
    || die "cannot read n_routed_experts from $ckpt/config.json"
  [[ -n "$ep" ]] || ep="${EASYEP_EXPERT_PARALLEL:-}"
  [[ -n "$pp" ]] || pp="${EASYEP_PIPELINE_PARALLEL:-}"
  local planned=""
  if [[ -z "$ep" && -z "$pp" ]]; then
    local memory="${EASYEP_GPU_MEMORY_GIB:-}"
    if [[ "$memory" == none ]]; then
      memory=""  # planning switched off: EP = gcd(world, n_routed_experts)
    elif [[ -z "$memory" ]] && command -v nvidia-smi >/dev/null 2>&1; then
      memory="$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -n 1 |
        awk '{ if ($1 > 0) printf "%.1f", $1 / 1024 }')" || memory=""
    fi
    if [[ -n "$memory" ]]; then
      local plan_tokens="${mbt:-${tokens:-4096}}" plan_json
      plan_json="$(mktemp)"
      local plan_cmd=("$py" "$REPO/converters/plan.py" --hf-checkpoint "$ckpt" --gpus-per-node "$nproc"
        --gpu-memory-gib "$memory" --max-length "$plan_tokens" --checkpoint-path "$ckpt" --world-size "$world"
        --json "$plan_json")
      ((dequant == 0)) || plan_cmd+=(--dtype bf16)
      PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "${plan_cmd[@]}" >"$plan_json.txt" \
        || die "converters/plan.py failed: $(tail -n 3 "$plan_json.txt")"
      # the best layout for this allocation (its GPUs divide the world: the rest are data-parallel
      # replicas), else the smallest overall, which the check below refuses with what to allocate
      planned="$("$py" -c 'import json, sys
p = json.load(open(sys.argv[1]))
r = p["for_world"] or p["recommended"]
print("" if r is None else " ".join(map(str, [r["pp"], r["ep"], r["gpus"], ",".join(map(str, r["stage_layers"]))])))' "$plan_json")" \
        || die "cannot read the plan in $plan_json"
      [[ -n "$planned" ]] || die "converters/plan.py finds no PP x EP layout that fits $nproc x $memory GiB GPUs at $plan_tokens tokens (see $plan_json.txt)"
      local plan_gpus
      read -r pp ep plan_gpus layout <<<"$planned"
      ((world % plan_gpus == 0)) || die "converters/plan.py recommends PP=$pp x EP=$ep ($plan_gpus GPUs) for $memory GiB GPUs at $plan_tokens tokens, but this allocation has $world ranks ($nnodes nodes x $nproc): allocate a multiple of $(((plan_gpus + nproc - 1) / nproc)) node(s)"
      log "converters/plan.py ($memory GiB per GPU, $plan_tokens tokens): PP=$pp x EP=$ep, stages $layout"
      PLAN_FILES=("$plan_json" "$plan_json.txt")
      args+=(--pipeline-parallel "$pp" --pipeline-layout "$layout" --expert-parallel "$ep")
    fi
  fi
  if [[ -z "$pp" ]]; then
    pp=1
  elif [[ -z "$planned" ]] && ! printf '%s\n' "${args[@]}" | grep -q -- '^--pipeline-parallel'; then
    args+=(--pipeline-parallel "$pp")
  fi
  is_positive_int "$pp" || die "bad pipeline parallel size '$pp'"
  ((world % pp == 0)) || die "pipeline parallel $pp does not divide the world size $world ($nnodes nodes x $nproc)"
  if [[ -z "$ep" ]]; then
    ep="$(gcd $((world / pp)) "$experts")"
    args+=(--expert-parallel "$ep")
  elif [[ -z "$planned" ]] && ! printf '%s\n' "${args[@]}" | grep -q -- '^--expert-parallel'; then
    args+=(--expert-parallel "$ep")
  fi
  is_positive_int "$ep" || die "bad expert parallel size '$ep'"
  if ((pp > 1)); then
    (((world / pp) % ep == 0)) || die "expert parallel $ep does not divide the ranks per pipeline stage, $((world / pp)) (world $world / pipeline parallel $pp)"
  else
    ((world % ep == 0)) || die "expert parallel $ep does not divide the world size $world ($nnodes nodes x $nproc)"
  fi
  ((experts % ep == 0)) || die "expert parallel $ep does not divide n_routed_experts $experts"

  local restarts="${SLURM_RESTART_COUNT:-0}"
  if ((resume == 0)); then
    if [[ -d "$output.inprogress" ]]; then
      args+=(--resume)
      log "resuming the interrupted run in $output.inprogress (restart $restarts)"
    elif ((restarts > 0)) && [[ -f "$output/scores.json" ]]; then
      log "requeued job (restart $restarts): $output is already complete, nothing to do"
      return 0
    elif ((restarts > 0)); then
      log "requeued job (restart $restarts) but no $output.inprogress: starting from the beginning"
    fi
  fi

  case "$output" in
    /tmp/* | /dev/shm/* | /var/tmp/*)
      if ((nnodes > 1)); then
        log "warning: $output looks node-local; the output and its .inprogress snapshots must be on shared storage"
      fi
      ;;
  esac

  local job_id="${SLURM_JOB_ID:-local$$}"
  local log_dir="${EASYEP_LOG_DIR:-$output.logs}/job$job_id-restart$restarts"
  local head port
  head="$(head_node "${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-$(hostname)}}")"
  port="${EASYEP_MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-$$} % 20000))}"
  mkdir -p "$log_dir"
  if ((${#PLAN_FILES[@]} > 0)); then
    mv "${PLAN_FILES[0]}" "$log_dir/plan.json"
    mv "${PLAN_FILES[1]}" "$log_dir/plan.txt"
  fi
  local args_file="$log_dir/score_args"
  printf '%s\0' "${args[@]}" >"$args_file"

  export EASYEP_PY="$py" EASYEP_NNODES="$nnodes" EASYEP_NPROC="$nproc" EASYEP_HEAD_NODE="$head"
  export EASYEP_PORT="$port" EASYEP_RDZV_ID="easyep-$job_id" EASYEP_RUN_LOG_DIR="$log_dir"
  export EASYEP_ARGS_FILE="$args_file" EASYEP_WORKDIR="$base"
  if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    local cpus="${SLURM_CPUS_ON_NODE:-${SLURM_CPUS_PER_TASK:-$nproc}}"
    cpus="${cpus%%(*}"
    is_positive_int "$cpus" || cpus="$nproc"
    export OMP_NUM_THREADS=$((cpus / nproc > 0 ? cpus / nproc : 1))
  fi
  local where="rendezvous ${head}:${port}"
  ((nnodes > 1)) || where="single node (torchrun --standalone)"
  log "$nnodes node(s) x $nproc process(es) = world $world: pipeline parallel $pp, expert parallel $ep, data parallel $((world / pp / ep)); $where; logs in $log_dir"

  if [[ "${EASYEP_NO_SRUN:-0}" != 1 ]] && command -v srun >/dev/null 2>&1; then
    local srun_cmd=(srun --nodes "$nnodes" --ntasks "$nnodes" --ntasks-per-node 1
      --kill-on-bad-exit=1 --export=ALL)
    # Slurm >= 22.05: srun no longer inherits sbatch's --cpus-per-task; without it the one task
    # per node (and all its torchrun workers) would get a single CPU.
    if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
      srun_cmd+=(--cpus-per-task "$SLURM_CPUS_PER_TASK")
    fi
    srun_cmd+=(bash "$SELF" --node-task)
    if [[ "${EASYEP_DRY_RUN:-0}" == 1 ]]; then
      printf 'srun:'
      printf ' %q' "${srun_cmd[@]}"
      printf '\n'
    fi
    "${srun_cmd[@]}"
  else
    ((nnodes == 1)) || die "srun is not on PATH: a $nnodes-node job needs srun to start one torchrun per node"
    node_main
  fi
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  if [[ "${1:-}" == "--node-task" ]]; then
    node_main
  else
    job_args=()
    for arg in "$@"; do
      if [[ "$arg" == --dry-run ]]; then
        export EASYEP_DRY_RUN=1  # node tasks (srun) inherit it
      else
        job_args+=("$arg")
      fi
    done
    job_main "${job_args[@]}"
  fi
fi
