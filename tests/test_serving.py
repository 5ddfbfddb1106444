"""Served by a real engine: vLLM (CPU build, own venv) loads the original and every kind of pruned
export and matches stock transformers token for token (docs/serving.md).

One module fixture does the user's whole path on a DeepSeek-V3-architecture checkpoint with
DeepSeek's latent widths (kv_lora_rank 512 + qk_rope_head_dim 64, the only MLA head size vLLM's CPU
kernel takes), 16 experts in 4 groups and an MTP layer: it scores with `launch/score.py` on 2 ranks,
exports with the converters (both group policies, --rebalance-bias, a C-Prune export with disabled
slots, a merged export (--merge output-frequency-aligned), the FP8 original exported then converted
to BF16), adds two deliberately broken copies (one
kept expert corrupted; a config the preflight flags), then runs ONE subprocess in .venv-serve
(tests/serving/vllm_worker.py) that serves every checkpoint in fp32.

The oracles are stock transformers on the same checkpoint (prompt log-probs and 16 greedy tokens)
and, for pruned exports, the ORIGINAL checkpoint in transformers with the pruned experts masked out
of routing (tests/test_export.py's masked router); for the merged export, the kept experts of that
original are first overwritten with tests/test_merge.py's independent merge of the recorded clusters. The tolerance is 1e-4 nats per token.

The serving venv is built by `make .venv-serve/.installed` (`make test` and `make serve-check` do it).
Without it this test FAILS: it is a CPU test, not a GPU one, so it never skips.
"""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_oracle import load_transformers_model, read_checkpoint_tensors
from test_export import masked_router_forward
from test_merge import oracle_experts, oracle_merge, stored_rounding
from megatron_easyep.checkpoint.reader import DeepseekV3Config
from megatron_easyep.checkpoint.tiny import make_tiny_checkpoint
from megatron_easyep.pruning.preflight import preflight_for_config
from megatron_easyep.pruning.selection import DISABLED_BIAS
from megatron_easyep.scoring.demo_data import write_demo_files

REPO = Path(__file__).resolve().parents[1]
SERVE_PYTHON = Path(os.environ.get("EASYEP_SERVE_PYTHON", REPO / ".venv-serve" / "bin" / "python"))
WORKER = REPO / "tests" / "serving" / "vllm_worker.py"
BOUND = 1e-4  # nats per prompt token
# the merged export against its in-memory oracle: the oracle rounds the exact (float64) merge to bf16,
# the export its fp32 merge; where the two sit within an fp32 ulp of a bf16 rounding tie they round
# apart by one bf16 ulp (a handful of elements: ~1e-4 nats here); vLLM vs transformers on the merged
# checkpoint itself keeps BOUND, and merging moves the log-probs by > 1e-2
MERGED_ORACLE_BOUND = 1e-3
GREEDY_TOKENS = 16
KEEP = 8
HEAVY_TIMEOUT = 600

# DeepSeek-V3 architecture, DeepSeek's latent widths, everything else small. YaRN rope_scaling (as
# DeepSeek-V3 ships) keeps rope in the comparison: vLLM's CPU kernel for PLAIN rope is wrong for MLA
# (docs/serving.md, bench/rope_repro.py), its YaRN rope runs in PyTorch and is right.
CHECKPOINT = dict(
    hidden_size=64, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=512, qk_rope_head_dim=64,
    qk_nope_head_dim=32, v_head_dim=32, n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4,
    num_nextn_predict_layers=1, max_position_embeddings=512,
)
FP8_BLOCK = [32, 32]


def _prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(7)
    return [[0] + [rng.randrange(4, vocab) for _ in range(n - 1)] for n in (9, 21, 40)]


# --------------------------------------------------------------------------------------------
# the user's path: score on 2 ranks, export several ways
# --------------------------------------------------------------------------------------------


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _run(*args, timeout=HEAVY_TIMEOUT) -> str:
    cmd = [str(a) for a in args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=_env(), timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc.stdout


def _score(ckpt: Path, demos: dict, out: Path, *extra) -> Path:
    _run(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         REPO / "launch" / "score.py", "--hf-checkpoint", ckpt, "--output", out, "--expert-parallel", 2,
         "--demos", f"{demos['math']}:math", "--demos", f"{demos['code']}:code", *extra)
    return out


def _export(src: Path, scores: Path, out: Path, *extra) -> Path:
    _run(sys.executable, REPO / "converters" / "export_pruned.py", "--hf-checkpoint", src, "--scores", scores,
         "--output", out, "--keep", KEEP, "--metric", "easyep", *extra)
    return out


def _corrupt_one_kept_expert(export: Path, out: Path) -> tuple[str, str]:
    """A copy of `export` with one kept expert's down_proj negated (same shapes, loads everywhere)."""
    shutil.copytree(export, out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    config = json.loads((out / "config.json").read_text())
    name = f"model.layers.{config['first_k_dense_replace']}.mlp.experts.0.down_proj.weight"
    shard = out / index["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = -tensors[name]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return name, shard.name


def _regroup_config(export: Path, out: Path, n_group: int, topk_group: int) -> dict:
    """A copy of `export` whose config declares another routing-group layout (weights unchanged)."""
    shutil.copytree(export, out)
    config = json.loads((out / "config.json").read_text())
    config.update(n_group=n_group, topk_group=topk_group)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return config


def build_checkpoints(root: Path) -> dict:
    """Every checkpoint vLLM serves, with what the oracles need. Returns {name: info}."""
    demos = write_demo_files(root / "demos", per_domain=4, heldout=1)
    src = make_tiny_checkpoint(root / "original", "tiny", seed=0, **CHECKPOINT)
    src_fp8 = make_tiny_checkpoint(root / "original-fp8", "tiny", fp8=True, seed=1, weight_block_size=FP8_BLOCK,
                                   **CHECKPOINT)
    scores = _score(src, demos, root / "scores", "--cprune-features")
    scores_fp8 = _score(src_fp8, demos, root / "scores-fp8")

    out = {"original": {"path": src, "oracle_source": None}}
    for policy in ("equal-per-group", "collapse"):
        path = _export(src, scores, root / policy, "--group-policy", policy)
        out[policy] = {"path": path, "oracle_source": src}
    path = _export(src, scores, root / "rebalance-bias", "--group-policy", "equal-per-group", "--rebalance-bias",
                   "--demos", f"{demos['math']}:math", "--demos", f"{demos['code']}:code", "--rebalance-steps", 50)
    out["rebalance-bias"] = {"path": path, "oracle_source": src, "oracle_bias_from_export": True}
    _run(sys.executable, REPO / "converters" / "cprune_select.py", "--hf-checkpoint", src, "--scores", scores,
         "--output", root / "cprune-disabled", "--keep", KEEP, "--global-keep-ratio", 0.75, "--uneven", "disable")
    out["cprune-disabled"] = {"path": root / "cprune-disabled", "oracle_source": src}
    path = _export(src, scores, root / "merged", "--group-policy", "equal-per-group",
                   "--merge", "output-frequency-aligned")  # features: the score dir's (--cprune-features)
    out["merged"] = {"path": path, "oracle_source": src, "merged": True}

    # FP8: score and prune the FP8 original, then convert the export (vLLM's CPU FP8 needs AMX)
    fp8_export = _export(src_fp8, scores_fp8, root / "fp8-equal-per-group", "--group-policy", "equal-per-group")
    _run(sys.executable, REPO / "converters" / "fp8_to_bf16.py", "--hf-checkpoint", fp8_export,
         "--output", root / "fp8-export-bf16")
    # its oracle: the FP8 original converted the same way, pruned experts masked
    _run(sys.executable, REPO / "converters" / "fp8_to_bf16.py", "--hf-checkpoint", src_fp8,
         "--output", root / "original-fp8-bf16")
    out["fp8-export-bf16"] = {"path": root / "fp8-export-bf16", "oracle_source": root / "original-fp8-bf16",
                              "pruning_record": fp8_export / "pruning.json"}

    # broken on purpose: the check must see them
    corrupted = root / "corrupted-expert"
    out["corrupted-expert"] = {"path": corrupted, "oracle_source": src, "broken": True,
                               "pruning_record": root / "equal-per-group" / "pruning.json",
                               "corrupted": _corrupt_one_kept_expert(root / "equal-per-group", corrupted)}
    # the preflight flags n_group not dividing E' (8 experts viewed as 3 groups)
    config = _regroup_config(root / "collapse", root / "ngroup-not-dividing", n_group=3, topk_group=2)
    out["ngroup-not-dividing"] = {"path": root / "ngroup-not-dividing", "preflight": preflight_for_config(config),
                                  "oracle_source": None, "transformers": False}
    return out


# --------------------------------------------------------------------------------------------
# oracles: stock transformers on the checkpoint, and the original with pruned experts masked
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def transformers_logprobs_and_greedy(model, prompts) -> tuple[list[list[float]], list[list[int]]]:
    logprobs, greedy = [], []
    for ids in prompts:
        logits = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
        logprobs.append([logits[t - 1, ids[t]].item() for t in range(1, len(ids))])
        sequence = list(ids)
        for _ in range(GREEDY_TOKENS):  # full re-run per token: no cache, no generation config
            sequence.append(int(model(torch.tensor([sequence])).logits[0, -1].argmax()))
        greedy.append(sequence[len(ids):])
    return logprobs, greedy


def _kept_and_routing(export: Path, record_path: Path | None, *, route_disabled=False) -> tuple[dict, int, int]:
    """Routable original expert ids per MoE layer (kept minus disabled, unless route_disabled) and the
    group rule of the export."""
    record = json.loads((record_path or export / "pruning.json").read_text())
    disabled = {} if route_disabled else {int(k): set(v) for k, v in (record.get("disabled_experts") or {}).items()}
    kept = {int(layer): tuple(i for i in ids if i not in disabled.get(int(layer), set()))
            for layer, ids in record["kept_experts"].items()}
    config = json.loads((export / "config.json").read_text())
    return kept, int(config["n_group"]), int(config["topk_group"])


def merge_in_memory(model, export: Path, source: Path) -> None:
    """Overwrite the original's kept experts with the merge of the clusters the export records,
    computed by tests/test_merge.py's oracle (float64, then the bf16 the export stores)."""
    assert not json.loads((source / "config.json").read_text()).get("quantization_config"), "bf16 source expected"
    record = json.loads((export / "pruning.json").read_text())["merge"]
    weights = oracle_experts(source)
    with torch.no_grad():
        for layer, by_kept in record["clusters"].items():
            if int(layer) >= model.config.num_hidden_layers:
                continue  # MTP: not part of serving
            experts = model.model.layers[int(layer)].mlp.experts
            for kept, members in by_kept.items():
                merged = {p: stored_rounding(v, "bf16", None) for p, v in
                          oracle_merge(weights, int(layer), [(m, w) for m, w in members], record["align"]).items()}
                experts.gate_up_proj[int(kept)] = torch.cat([merged["gate_proj"], merged["up_proj"]])
                experts.down_proj[int(kept)] = merged["down_proj"]


def masked_oracle(info: dict, prompts, *, route_disabled=False):
    """The original in transformers, routing restricted to the export's routable experts (for a
    merged export, with the kept experts merged in memory)."""
    model = load_transformers_model(info["oracle_source"])
    if info.get("merged"):
        merge_in_memory(model, info["path"], info["oracle_source"])
    kept, n_group, topk_group = _kept_and_routing(info["path"], info.get("pruning_record"),
                                                  route_disabled=route_disabled)
    original_groups = model.config.n_group
    # equal-per-group keeps the original groups (each now smaller); collapse routes ungrouped
    grouping = (original_groups, topk_group) if n_group > 1 else (1, 1)
    export_tensors = read_checkpoint_tensors(info["path"]) if info.get("oracle_bias_from_export") else None
    for layer, ids in kept.items():
        if layer >= model.config.num_hidden_layers:
            continue  # MTP: not part of serving
        gate = model.model.layers[layer].mlp.gate
        if export_tensors is not None:  # rebalanced bias: the original's router with the export's bias
            bias = export_tensors[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"]
            with torch.no_grad():
                gate.e_score_correction_bias[list(ids)] = bias.to(gate.e_score_correction_bias.dtype)
        gate.forward = functools.partial(masked_router_forward, gate, ids, *grouping)
    return transformers_logprobs_and_greedy(model, prompts)


# --------------------------------------------------------------------------------------------
# vLLM, in its own venv, one process for every checkpoint
# --------------------------------------------------------------------------------------------


def _require_serving_venv() -> None:
    probe = None
    if SERVE_PYTHON.exists():
        probe = subprocess.run([str(SERVE_PYTHON), "-c", "import vllm; print(vllm.__version__)"],
                               capture_output=True, text=True, timeout=300, env=_worker_env())
    if probe is None or probe.returncode != 0:
        detail = "missing" if probe is None else probe.stderr[-2000:]
        pytest.fail(f"the serving venv {SERVE_PYTHON} is not usable ({detail}); build it with "
                    "`make .venv-serve/.installed` (make test and make serve-check do)", pytrace=False)


def _worker_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # in-process engine: no spawned engine core, faster start-up on 2 cores
    env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_LOGGING_LEVEL="WARNING", TOKENIZERS_PARALLELISM="false")
    return env


def serve_all(checkpoints: dict, prompts, work: Path) -> dict:
    request = {"models": [{"name": name, "path": str(info["path"])} for name, info in checkpoints.items()],
               "prompts": prompts, "max_tokens": GREEDY_TOKENS, "max_model_len": 256}
    (work / "request.json").write_text(json.dumps(request))
    cmd = [str(SERVE_PYTHON), str(WORKER), str(work / "request.json"), str(work / "result.json")]
    with open(work / "vllm.log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=_worker_env(),
                              timeout=HEAVY_TIMEOUT)
    assert proc.returncode == 0, f"vLLM worker failed; see {work / 'vllm.log'}:\n" + \
        (work / "vllm.log").read_text()[-4000:]
    return json.loads((work / "result.json").read_text())


# --------------------------------------------------------------------------------------------
# the fixture: everything once
# --------------------------------------------------------------------------------------------


def _max_abs_diff(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(x) for x in a] == [len(x) for x in b]
    return max(abs(x - y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    _require_serving_venv()
    root = tmp_path_factory.mktemp("serving")
    started = time.time()
    checkpoints = build_checkpoints(root)
    built = time.time()
    prompts = _prompts(DeepseekV3Config.load(checkpoints["original"]["path"]).vocab_size)
    vllm = serve_all(checkpoints, prompts, root)
    served_at = time.time()
    rows = {}
    for name, info in checkpoints.items():
        row = {"vllm": vllm[name]}
        if info.get("transformers", True):
            row["transformers"] = transformers_logprobs_and_greedy(load_transformers_model(info["path"]), prompts)
        if info["oracle_source"] is not None:
            row["oracle"] = masked_oracle(info, prompts)
        rows[name] = row
    summary = _summary(checkpoints, rows)
    summary["seconds"] = {"build_score_export": round(built - started, 1), "vllm": round(served_at - built, 1),
                          "transformers": round(time.time() - served_at, 1)}
    out_dir = REPO / "runs" / "serve-check"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return {"checkpoints": checkpoints, "rows": rows, "prompts": prompts, "summary": summary, "root": root}


def _summary(checkpoints, rows) -> dict:
    out = {}
    for name, row in rows.items():
        entry = {}
        if "error" in row["vllm"]:
            entry["vllm_error"] = f"{row['vllm']['phase']}: {row['vllm']['error']}"
        else:
            for oracle in ("transformers", "oracle"):
                if oracle in row:
                    entry[f"max_diff_vs_{oracle}"] = _max_abs_diff(row["vllm"]["prompt_logprobs"], row[oracle][0])
                    entry[f"greedy_equal_{oracle}"] = row["vllm"]["greedy"] == row[oracle][1]
            entry["engine"] = row["vllm"]["engine"]
        out[name] = entry
    return out


SERVED_EXPORTS = ["original", "equal-per-group", "collapse", "rebalance-bias", "cprune-disabled", "merged",
                  "fp8-export-bf16"]


# --------------------------------------------------------------------------------------------
# must show
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SERVED_EXPORTS)
def test_vllm_matches_transformers_on_the_export(served, name):
    row = served["rows"][name]
    assert "error" not in row["vllm"], f"vLLM refused {name}: {row['vllm']['error']}"
    diff = _max_abs_diff(row["vllm"]["prompt_logprobs"], row["transformers"][0])
    assert diff <= BOUND, f"{name}: vLLM vs transformers prompt log-probs differ by {diff:.3g} nats"
    assert row["vllm"]["greedy"] == row["transformers"][1], f"{name}: greedy tokens differ"


@pytest.mark.parametrize("name", [n for n in SERVED_EXPORTS if n != "original"])
def test_vllm_matches_the_masked_routing_oracle(served, name):
    """The export served by vLLM acts as the original with the pruned experts removed from routing
    (for cprune-disabled: never routed to a disabled slot; for rebalance-bias: with the new bias)."""
    row = served["rows"][name]
    diff = _max_abs_diff(row["vllm"]["prompt_logprobs"], row["oracle"][0])
    bound = MERGED_ORACLE_BOUND if served["checkpoints"][name].get("merged") else BOUND
    assert diff <= bound, f"{name}: vLLM vs the masked original differ by {diff:.3g} nats"
    assert row["vllm"]["greedy"] == row["oracle"][1], f"{name}: greedy tokens differ from the masked original"
    unpruned = served["rows"]["original"]["transformers"][0]
    assert _max_abs_diff(row["vllm"]["prompt_logprobs"], unpruned) > 1e-2, "pruning should change the model"


def test_disabled_slots_matter(served):
    """The C-Prune export really has disabled slots (bias -1e4), and routing to them would show:
    the original masked to kept experts WITH the disabled ones differs from what vLLM served."""
    info = served["checkpoints"]["cprune-disabled"]
    record = json.loads((info["path"] / "pruning.json").read_text())
    tensors = read_checkpoint_tensors(info["path"])
    config = json.loads((info["path"] / "config.json").read_text())
    disabled_slots = 0
    for layer in range(config["first_k_dense_replace"], config["num_hidden_layers"]):
        bias = tensors[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"]
        disabled_slots += int((bias == DISABLED_BIAS).sum())
    assert disabled_slots > 0, f"no disabled slot in the C-Prune export (record: {record.get('disabled_experts')})"
    enabled_everywhere, _ = masked_oracle(info, served["prompts"], route_disabled=True)
    served_logprobs = served["rows"]["cprune-disabled"]["vllm"]["prompt_logprobs"]
    assert _max_abs_diff(served_logprobs, enabled_everywhere) > 1e-2, "the disabled slots would not be routed anyway"


def test_the_merged_experts_are_what_was_served(served):
    """The merged export keeps the equal-per-group export's experts (same selection) but serves
    other weights: the merge really reached vLLM (its oracle above had the merged experts)."""
    merged, pruned = served["checkpoints"]["merged"], served["checkpoints"]["equal-per-group"]
    record = json.loads((merged["path"] / "pruning.json").read_text())
    assert record["kept_experts"] == json.loads((pruned["path"] / "pruning.json").read_text())["kept_experts"]
    assert record["merge"]["rule"] == "output-frequency-aligned" and record["merge"]["clusters"]
    diff = _max_abs_diff(served["rows"]["merged"]["vllm"]["prompt_logprobs"],
                         served["rows"]["equal-per-group"]["vllm"]["prompt_logprobs"])
    assert diff > 1e-2, f"the merged export serves like the pruned one (max diff {diff:.3g} nats)"


def test_rebalanced_bias_is_what_was_served(served):
    """--rebalance-bias changed the kept experts' bias (so the oracle above used a new bias)."""
    info = served["checkpoints"]["rebalance-bias"]
    kept, _, _ = _kept_and_routing(info["path"], None)
    original, export = read_checkpoint_tensors(info["oracle_source"]), read_checkpoint_tensors(info["path"])
    name = "model.layers.{}.mlp.gate.e_score_correction_bias"
    moved = max((export[name.format(layer)] - original[name.format(layer)][list(ids)]).abs().max().item()
                for layer, ids in kept.items())
    assert moved > 1e-3, f"the rebalanced bias moved by only {moved:.3g}"


def test_a_corrupted_kept_expert_is_detected(served):
    """The check can fail: one kept expert's weight negated in an export. vLLM and transformers agree
    on the broken file (vLLM serves what it is given), and the masked-routing oracle catches it."""
    row = served["rows"]["corrupted-expert"]
    assert "error" not in row["vllm"], row["vllm"]
    assert _max_abs_diff(row["vllm"]["prompt_logprobs"], row["transformers"][0]) <= BOUND
    diff = _max_abs_diff(row["vllm"]["prompt_logprobs"], row["oracle"][0])
    assert diff > 100 * BOUND, f"a corrupted expert moved vLLM's log-probs by only {diff:.3g} nats"


def test_preflight_prediction_holds_in_vllm(served):
    """n_group not dividing E': the preflight flags it, and vLLM fails on it (its grouped top-k views
    the scores as [tokens, n_group, E'/n_group]); it does not route ungrouped, as the preflight used
    to say. The checkpoint is served last: a failed forward may leave the in-process engine unusable."""
    info = served["checkpoints"]["ngroup-not-dividing"]
    check = info["preflight"]["checks"]["vllm_grouped_topk_valid"]
    assert not check["ok"]
    assert "every request fails" in check["detail"], check["detail"]
    row = served["rows"]["ngroup-not-dividing"]
    assert "error" in row["vllm"], "vLLM served a checkpoint whose n_group does not divide E'"
    # it loads, then the first forward fails in the grouped top-k's view
    assert row["vllm"]["phase"] == "generate", row["vllm"]
    assert "invalid for input of size" in row["vllm"]["error"], row["vllm"]["error"]
