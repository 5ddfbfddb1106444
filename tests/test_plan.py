"""Memory planning (megatron_easyep.mcore.plan, converters/plan.py): counts against DeepSeek-V3's published
sizes and against the tensors of generated checkpoints (exact), the layout arithmetic, the CLI."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from megatron_easyep.mcore import plan
from megatron_easyep.checkpoint.reader import DeepseekV3Config

REPO = Path(__file__).resolve().parents[1]
GIB = 1024**3

# DeepSeek-V3's config.json, as shared/reference/deepseek-checkpoint.md lists it.
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
    "first_k_dense_replace": 3, "moe_layer_freq": 1, "n_routed_experts": 256, "n_shared_experts": 1,
    "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True,
    "num_nextn_predict_layers": 1, "q_lora_rank": 1536, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "max_position_embeddings": 163840, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": [128, 128]},
}


@pytest.fixture(scope="module")
def v3_config_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dsv3") / "config.json"
    path.write_text(json.dumps(DEEPSEEK_V3))
    return path


@pytest.fixture(scope="module")
def v3(v3_config_file) -> DeepseekV3Config:
    return DeepseekV3Config.load(v3_config_file.parent)


# --------------------------------------------------------------------------------------------
# 1. DeepSeek-V3: 671B total, 37B activated
# --------------------------------------------------------------------------------------------

# By hand, from the shapes (H=7168, 128 heads, q_lora 1536, kv_lora 512, nope 128, rope 64, v 128):
ATTENTION = (1536 * 7168 + 1536 + 128 * 192 * 1536      # q_a_proj, q_a_layernorm, q_b_proj
             + 576 * 7168 + 512 + 128 * 256 * 512        # kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj
             + 7168 * 128 * 128)                         # o_proj
EXPERT = 3 * 7168 * 2048                                 # gate, up, down
LAYER_NORMS = 2 * 7168
EMBEDDING = 129280 * 7168
V3_TOTAL = (61 * (ATTENTION + LAYER_NORMS) + 3 * 3 * 7168 * 18432
            + 58 * (256 * EXPERT + EXPERT + 256 * 7168 + 256)  # routed, shared, router + bias
            + 2 * EMBEDDING + 7168)                            # embedding, lm_head, final norm
V3_ACTIVATED = V3_TOTAL - EMBEDDING - 58 * 248 * EXPERT        # 8 of 256 routed experts per token
V3_MTP = ATTENTION + LAYER_NORMS + 257 * EXPERT + 256 * 7168 + 256 + 3 * 7168 + 7168 * 14336 + 2 * EMBEDDING


def test_deepseek_v3_parameter_counts(v3):
    size = plan.model_size(v3)
    assert size.total_params == V3_TOTAL
    assert abs(size.total_params - 671e9) / 671e9 < 0.01
    assert size.activated_params == V3_ACTIVATED
    assert abs(size.activated_params - 37e9) / 37e9 < 0.015  # 36.63 B
    assert size.embedding_params == EMBEDDING
    assert size.mtp_params == V3_MTP
    # the HF card's 685B = 671B main + 14B MTP
    assert abs(size.total_params + size.mtp_params - 685e9) / 685e9 < 0.01
    routed = size.params(categories={"routed_experts"}, scope="main")
    assert routed == 58 * 256 * EXPERT


def test_deepseek_v3_fp8_bytes_match_the_published_checkpoint_size(v3):
    size = plan.model_size(v3)
    # R1/V3 on the hub: ~641 GiB (688.6 GB) of safetensors, scales included
    assert abs(size.bytes("fp8") / GIB - 641) < 1.5
    # a quantised 2048x7168 expert weight: 2048*7168 bytes + 16*56 float32 scales
    experts = size.select(scope="main", categories={"routed_experts"})[0]
    assert experts.scale_elements == 58 * 256 * (2 * 16 * 56 + 56 * 16)
    assert experts.bytes("fp8") == 58 * 256 * EXPERT + 4 * experts.scale_elements
    assert experts.bytes("bf16") == 2 * 58 * 256 * EXPERT


def test_pruned_counts_scale_only_the_routed_experts_and_router(v3):
    full, half = plan.model_size(v3), plan.model_size(v3, 128)
    assert full.total_params - half.total_params == 58 * 128 * (EXPERT + 7168 + 1)
    assert full.mtp_params - half.mtp_params == 128 * (EXPERT + 7168 + 1)
    assert half.activated_params == V3_ACTIVATED - 58 * 128 * (7168 + 1)  # only the router shrinks


# --------------------------------------------------------------------------------------------
# 2. exact against generated checkpoints
# --------------------------------------------------------------------------------------------

def _category(name: str, num_layers: int) -> tuple[str, str]:
    m = re.match(r"model\.layers\.(\d+)\.(.+)$", name)
    if not m:
        return "main", {"model.embed_tokens.weight": "embedding", "model.norm.weight": "final_norm",
                        "lm_head.weight": "lm_head"}[name]
    scope = "mtp" if int(m.group(1)) >= num_layers else "main"
    rest = m.group(2)
    for pattern, category in ((r"self_attn\.", "attention"),
                              (r"(input|post_attention)_layernorm\.", "norms"),
                              (r"mlp\.gate\.", "router"), (r"mlp\.experts\.", "routed_experts"),
                              (r"mlp\.shared_experts\.", "shared_experts"),
                              (r"mlp\.(gate|up|down)_proj\.", "dense_mlp"),
                              (r"(enorm|hnorm|eh_proj|shared_head|embed_tokens)", "mtp_extra")):
        if re.match(pattern, rest):
            return scope, category
    raise AssertionError(f"uncategorised tensor {name}")


def _checkpoint_totals(ckpt: Path) -> dict:
    """{(scope, category): [params, bytes]} from the safetensors files (scales count as bytes)."""
    num_layers = json.loads((ckpt / "config.json").read_text())["num_hidden_layers"]
    totals: dict = {}
    for shard in sorted(ckpt.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                base = name.removesuffix("_scale_inv")
                entry = totals.setdefault(_category(base, num_layers), [0, 0])
                if not name.endswith("_scale_inv"):
                    entry[0] += t.numel()
                entry[1] += t.numel() * t.element_size()
    return totals


@pytest.mark.parametrize("variant", [
    dict(),
    dict(fp8=True, weight_block_size=[24, 16]),
    dict(fp8=True, num_nextn_predict_layers=1, q_lora_rank=None, n_shared_experts=2),
    dict(num_nextn_predict_layers=1, tie_word_embeddings=False, n_shared_experts=0),
], ids=["tiny-bf16", "tiny-fp8-24x16", "tiny-fp8-mtp-noqlora", "tiny-bf16-mtp-noshared"])
def test_counts_equal_the_tensors_of_a_generated_checkpoint(tiny_checkpoint_factory, variant):
    ckpt = tiny_checkpoint_factory(**variant)
    cfg = DeepseekV3Config.load(ckpt)
    size = plan.model_size(cfg)
    dtype = "fp8" if variant.get("fp8") else "bf16"
    from_files = _checkpoint_totals(ckpt)
    from_plan = {(p.scope, p.category): [p.params, p.bytes(dtype)] for p in size.parts}
    assert from_plan == from_files
    index = ckpt / "model.safetensors.index.json"
    assert size.bytes(dtype) == json.loads(index.read_text())["metadata"]["total_size"]
    assert size.params() == sum(v[0] for v in from_files.values())


# --------------------------------------------------------------------------------------------
# 3. layouts
# --------------------------------------------------------------------------------------------

# bf16 bytes one rank holds per decoder layer at EP=8, by hand
DENSE_LAYER_BF16 = 2 * (ATTENTION + LAYER_NORMS + 3 * 7168 * 18432)
MOE_LAYER_BF16_EP8 = 2 * (ATTENTION + LAYER_NORMS + EXPERT + 256 * 7168) + 4 * 256 + 2 * 32 * EXPERT
H100 = int(79.6 * GIB)  # what an 80 GB GPU reports


def test_bf16_scoring_at_16k_tokens_on_four_nodes_is_pp4_x_ep8(v3):
    layouts = plan.scoring_layouts(v3, gpus_per_node=8, gpu_memory_bytes=H100, dtype="bf16", tokens=16384)
    best = layouts[0]
    assert (best.pp, best.ep, best.gpus, best.nodes, best.gpus_per_node) == (4, 8, 32, 4, 8)
    assert best.stage_layers == (16, 15, 15, 15) and best.ep_within_node  # one stage per node
    # stage 0: embedding + 3 dense + 13 MoE layers; the others 15 MoE layers; no lm_head, no norm
    assert best.stage_weight_bytes == (2 * EMBEDDING + 3 * DENSE_LAYER_BF16 + 13 * MOE_LAYER_BF16_EP8,
                                       15 * MOE_LAYER_BF16_EP8, 15 * MOE_LAYER_BF16_EP8,
                                       15 * MOE_LAYER_BF16_EP8)
    assert best.weights_bytes == 15 * MOE_LAYER_BF16_EP8
    assert abs(best.weights_bytes / GIB - 45.9) < 0.05  # shared/reference/scale-and-fp8.md
    assert best.activation_bytes == sum(plan.scoring_activation_bytes(
        v3, tokens=16384, expert_parallel=8).values())
    assert best.per_rank_bytes <= H100
    # nothing on fewer GPUs fits: PP=3 x EP=8 holds 20-21 layers per rank
    assert all(l.gpus >= 32 for l in layouts)
    line = best.torchrun(checkpoint="/ckpt", tokens=16384, dequantize_at_load=True)
    assert line == ("torchrun --nnodes 4 --nproc-per-node 8 --node-rank $NODE_RANK --master-addr "
                    "$MASTER_ADDR --master-port 29500 launch/score.py --hf-checkpoint /ckpt "
                    "--expert-parallel 8 --pipeline-parallel 4 --pipeline-layout 16,15,15,15 "
                    "--max-length 16384 --dequantize-at-load")


def test_fp8_resident_scoring_at_16k_tokens_on_two_nodes_is_pp2_x_ep8(v3):
    best = plan.scoring_layouts(v3, gpus_per_node=8, gpu_memory_bytes=H100, dtype="fp8", tokens=16384)[0]
    assert (best.pp, best.ep, best.gpus, best.nodes) == (2, 8, 16, 2)
    assert best.stage_layers == (31, 30)
    assert abs(best.weights_bytes / GIB - 46) < 0.5  # shared/reference/scale-and-fp8.md: ~46
    assert "fp8_dequant" in plan.scoring_activation_bytes(v3, tokens=16, expert_parallel=8, fp8_resident=True)
    # over both stages at EP = 1 the stages hold the whole main model but lm_head and final norm
    size = plan.model_size(v3)
    for dtype in ("bf16", "fp8"):
        assert sum(plan.stage_weights(v3, dtype, 1, [31, 30])) == size.bytes(
            dtype, scope="main", exclude={"lm_head", "final_norm"})


def test_pp1_layouts_and_the_imbalance_factor(v3):
    layouts = plan.scoring_layouts(v3, gpus_per_node=8, gpu_memory_bytes=80 * GIB, max_pp=1, dtype="bf16")
    best = layouts[0]
    # EP=32 fits at 4k tokens now that scoring builds no lm_head (1.7 GiB) and no logits (2 GiB)
    assert (best.ep, best.pp, best.gpus, best.nodes) == (32, 1, 32, 4)
    replicated = 2 * (V3_TOTAL - 58 * 256 * EXPERT - 58 * 256 - EMBEDDING - 7168) + 4 * 58 * 256
    assert best.weights_bytes == int(replicated + 2 * 58 * 256 * EXPERT / 32)  # no lm_head, no norm
    assert abs(best.weights_bytes / GIB - (69.9 - 1.7)) < 0.1  # scale-and-fp8.md, less lm_head
    assert all(l.ep >= 32 for l in layouts)  # EP=16 misses at PP=1
    one = plan.scoring_activation_bytes(v3, tokens=4096, expert_parallel=8, imbalance=1.0)
    three = plan.scoring_activation_bytes(v3, tokens=4096, expert_parallel=8, imbalance=3.0)
    assert three["moe_dispatch"] == 3 * one["moe_dispatch"] == 3 * 4096 * 8 * (4 * 7168 + 4 * 2048) * 2
    assert "logits" not in one  # scoring builds no output layer
    assert plan.logits_bytes(v3, 16384) == 2 * 16384 * 129280 * 2


def test_scoring_layout_on_141gib_gpus(v3):
    best = plan.scoring_layouts(v3, gpus_per_node=8, gpu_memory_bytes=141 * GIB, dtype="bf16")[0]
    assert best.gpus == 16 and best.ep_within_node


def test_serving_layouts_for_deepseek_v3(v3):
    full = plan.smallest_serving_layout(v3, 256, gpus_per_node=8, gpu_memory_bytes=80 * GIB)
    assert (full.gpus, full.nodes, full.tp, full.ep) == (16, 2, 8, 16)  # 2 x 8 H800, as deployed
    h200 = plan.smallest_serving_layout(v3, 256, gpus_per_node=8, gpu_memory_bytes=141 * GIB)
    assert (h200.gpus, h200.nodes) == (8, 1)                           # one 8 x H200 node
    half = plan.smallest_serving_layout(v3, 128, gpus_per_node=8, gpu_memory_bytes=80 * GIB)
    assert (half.gpus, half.nodes) == (8, 1)
    size = plan.model_size(v3, 128)
    experts = size.bytes("fp8", categories={"routed_experts"})
    assert half.weights_bytes == int((size.bytes("fp8") - experts) / 8 + experts / 8)
    assert half.kv_bytes == 61 * 576 * 2 * 65536
    assert half.per_gpu_bytes <= 0.9 * 80 * GIB
    # a layout is only ever one where EP divides M: M=96 cannot use 64 GPUs, etc.
    for kept in plan.default_keeps(256):
        layout = plan.smallest_serving_layout(v3, kept, gpus_per_node=8, gpu_memory_bytes=80 * GIB)
        assert kept % layout.ep == 0 and 128 % layout.tp == 0
    assert plan.smallest_serving_layout(v3, 256, gpus_per_node=8, gpu_memory_bytes=1 * GIB) is None


def test_default_keeps_and_routing_problems(v3):
    assert plan.default_keeps(256) == [256, 192, 128, 96, 64, 32]
    assert plan.default_keeps(16) == [16, 12, 8, 6, 4, 2]
    assert plan.routing_problems(v3, 96) == []
    assert plan.routing_problems(v3, 100) == ["M=100 is not divisible by n_group=8"]
    assert plan.routing_problems(v3, 8) == ["M/n_group=1 < 2 experts per group"]


# --------------------------------------------------------------------------------------------
# 4. the command
# --------------------------------------------------------------------------------------------

def _plan(*args):
    """The command as users run it (a subprocess)."""
    return subprocess.run([sys.executable, str(REPO / "converters" / "plan.py"), *args],
                          capture_output=True, text=True, timeout=120)


def _plan_main():
    """converters/plan.py's main(), loaded from its file, for the fast in-process cases."""
    spec = importlib.util.spec_from_file_location("plan_cli", REPO / "converters" / "plan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_plan_command(v3_config_file, tmp_path):
    out_json = tmp_path / "plan.json"
    proc = _plan("--config", str(v3_config_file), "--gpus-per-node", "8", "--gpu-memory-gib", "80",
                 "--keep", "256", "128", "--json", str(out_json))
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "671.03 B main model" in text and "36.63 B activated" in text
    # the V3 config is an FP8 checkpoint: FP8-resident weights by default
    assert "weights: FP8-resident" in text and "tensor parallelism is not supported" in text
    assert re.search(r"^\s+256\s.*\s16\s+2\s+8\s+16\s", text, re.M), text
    assert re.search(r"^\s+128\s.*\s8\s+1\s+8\s+8\s", text, re.M), text
    data = json.loads(out_json.read_text())
    assert data["total_params"] == V3_TOTAL
    assert [r["layout"]["gpus"] for r in data["serving"]] == [16, 8]
    assert data["weights"] == "fp8" and data["recommended"]["pp"] * data["recommended"]["ep"] == \
        data["recommended"]["gpus"]


def test_plan_command_recommends_pp_x_ep_at_16k(v3_config_file, tmp_path):
    out_json = tmp_path / "plan.json"
    proc = _plan("--config", str(v3_config_file), "--gpus-per-node", "8", "--gpu-memory-gib", "79.6",
                 "--max-length", "16384", "--dtype", "bf16", "--checkpoint-path", "/data/v3",
                 "--json", str(out_json))
    assert proc.returncode == 0, proc.stderr
    assert "-> smallest: PP=4 x EP=8 on 32 GPUs (4 node(s) x 8)" in proc.stdout
    assert ("launch/score.py --hf-checkpoint /data/v3 --expert-parallel 8 --pipeline-parallel 4 "
            "--pipeline-layout 16,15,15,15 --max-length 16384 --dequantize-at-load") in proc.stdout
    assert "saves 1.7 GiB of weights" in proc.stdout
    data = json.loads(out_json.read_text())
    assert data["recommended"] == {"pp": 4, "ep": 8, "gpus": 32, "nodes": 4, "gpus_per_node": 8,
                                   "stage_layers": [16, 15, 15, 15]}
    assert data["scoring"][0]["torchrun"].startswith("torchrun --nnodes 4 --nproc-per-node 8")
    fp8 = _plan("--config", str(v3_config_file), "--gpus-per-node", "8", "--gpu-memory-gib", "79.6",
                "--max-length", "16384")
    assert "-> smallest: PP=2 x EP=8 on 16 GPUs (2 node(s) x 8)" in fp8.stdout


def test_plan_prints_a_launch_line_that_runs_as_printed(tiny_ckpt, tmp_path):
    """The torchrun line plan prints for a checkpoint, run exactly as printed, scores it."""
    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(json.dumps({"input_ids": list(range(3, 3 + n))}) + "\n" for n in (12, 20)))
    proc = _plan("--hf-checkpoint", str(tiny_ckpt), "--gpus-per-node", "2", "--gpu-memory-gib", "8",
                 "--max-length", "64", "--demos", f"{demos}:d", "--output", str(tmp_path / "scores"))
    assert proc.returncode == 0, proc.stderr
    line = [ln.strip() for ln in proc.stdout.splitlines() if ln.strip().startswith("torchrun ")][0]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}:{__import__('os').environ.get('PATH', '')}"}
    run = subprocess.run(["bash", "-c", line], cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, (line, run.stderr[-3000:])
    assert json.loads((tmp_path / "scores" / "scores.json").read_text())["tokens"]["all"] == 32


def test_plan_command_from_a_checkpoint_dir(tiny_ckpt, capsys):
    assert _plan_main()(["--hf-checkpoint", str(tiny_ckpt), "--gpus-per-node", "2",
                         "--gpu-memory-gib", "8"]) == 0
    out = capsys.readouterr().out
    assert "-> smallest: PP=1 x EP=1 on 1 GPUs" in out
    assert re.search(r"^\s+16\s", out, re.M)  # default keeps start at E = 16


@pytest.mark.parametrize("args, message", [
    (["--keep", "300"], "--keep 300: must be between 1 and n_routed_experts 256"),
    (["--gpus-per-node", "0"], "--gpus-per-node must be >= 1"),
    (["--gpu-memory-gib", "-1"], "--gpu-memory-gib must be > 0"),
    (["--imbalance", "0.5"], "--imbalance must be >= 1"),
])
def test_plan_command_rejects_bad_input(v3_config_file, args, message, capsys):
    base = ["--config", str(v3_config_file), "--gpus-per-node", "8", "--gpu-memory-gib", "80"]
    assert _plan_main()([*base, *args]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


def test_plan_command_missing_or_bad_config(tmp_path, capsys):
    main = _plan_main()
    assert main(["--config", str(tmp_path / "nope.json"), "--gpus-per-node", "8",
                 "--gpu-memory-gib", "80"]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({**DEEPSEEK_V3, "n_group": 3}))
    assert main(["--config", str(bad), "--gpus-per-node", "8", "--gpu-memory-gib", "80"]) == 2
    assert "n_group" in capsys.readouterr().err


SCORER_PEAK_WORKER = r"""
import ctypes, json, sys
import torch
from megatron_easyep.mcore import compat
from megatron_easyep.scoring.scorer import ExpertScorer

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

T, H, E, K = (int(v) for v in sys.argv[1:5])
ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # large blocks straight from / back to the OS
gen = torch.Generator().manual_seed(0)
logits = torch.randn(T, E, generator=gen)
top = logits.topk(K, dim=-1).indices
routing = torch.zeros(T, E, dtype=torch.bool).scatter_(1, top, True)
probs = torch.where(routing, torch.rand(T, E, generator=gen) + 0.1, torch.zeros(T, E))
local, token = routing.T.nonzero().unbind(1)  # rows grouped by expert, tokens in order
rows = torch.randn(local.shape[0], H, generator=gen) * probs[token, local][:, None]
obs = compat.MoEObservation(
    residual=torch.randn(T, H, generator=gen), moe_input=torch.randn(T, H, generator=gen),
    routed_output=torch.randn(T, H, generator=gen), routing_map=routing, probs=probs, expert_rows=rows,
    row_probs=probs[token, local], tokens_per_local_expert=routing.sum(0), local_expert_ids=list(range(E)))
scorer = ExpertScorer([0], E, ["all"])
scorer.begin_step(torch.zeros(T, dtype=torch.long))
scorer.observe(0, obs)  # warm-up: lazy state (top-k, id cache)
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM)
base = status("VmRSS:")
scorer.observe(0, obs)
print(json.dumps({"peak": status("VmHWM:") - base, "rows": int(rows.shape[0])}))
"""


@pytest.mark.parametrize("tokens, hidden, experts, top_k", [(4096, 1024, 16, 4), (512, 256, 64, 8)])
def test_plan_scorer_estimate_matches_what_the_scorer_allocates(tokens, hidden, experts, top_k, tmp_path):
    """The scorer's transient peak for one MoE layer, measured (VmHWM reset before observe), against
    plan.scorer_bytes: an upper bound, within 30% (fp32 model, EP 1)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", SCORER_PEAK_WORKER, str(tokens), str(hidden), str(experts),
                           str(top_k)], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    estimate = plan.scorer_bytes(tokens=tokens, hidden=hidden, top_k=top_k, expert_parallel=1,
                                 local_experts=experts, rows=measured["rows"], dtype_bytes=4)
    assert measured["peak"] <= estimate * 1.02 + (1 << 20), (measured, estimate)
    assert measured["peak"] >= 0.7 * estimate, (measured, estimate)
