"""FP8-resident weights (mcore/compat/fp8_linears.py, mcore/fp8_gemm.py): what the loaded model holds,
and that computing from it changes nothing.

Oracles: the dequantise-at-load path (a second computation path; logits and scores must be
torch.equal), the checkpoint's own bytes read from the safetensors shards, and fp8_emulation for the
Triton kernels (run on CPU under TRITON_INTERPRET=1)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# 20-row blocks: the 32-row gate of every expert ends in a partial block, and the rope rows of
# q_b_proj's first head (16..23) straddle a block edge, so the rope permutation crosses blocks.
BLOCK = [20, 16]


@pytest.fixture(scope="module")
def fp8_ckpt(tiny_checkpoint_factory):
    return tiny_checkpoint_factory(fp8=True, weight_block_size=BLOCK, rope_interleave=False)


def _torchrun(nproc: int, *args, timeout=600) -> None:
    proc = subprocess.run([*TORCHRUN, "--nproc-per-node", str(nproc), str(TESTS / "fp8_resident_worker.py"),
                           *map(str, args)], capture_output=True, text=True, env=ENV, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def one_rank(fp8_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp8res") / "ep1.pt"
    _torchrun(1, out, fp8_ckpt, 1, "alltoall")
    return torch.load(out, weights_only=False)


def _assert_same(a: dict, b: dict) -> None:
    assert len(a["logits"]) == len(b["logits"])
    for x, y in zip(a["logits"], b["logits"]):
        assert torch.equal(x, y)
    assert torch.equal(a["sums"], b["sums"]) and torch.equal(a["tokens"], b["tokens"])
    assert a["sums"][:, -1].sum() > 0  # frequency: tokens were routed and counted


def test_default_is_bitwise_the_dequantize_at_load_path_ep1(one_rank):
    res, deq = one_rank["alltoall"]["resident"], one_rank["alltoall"]["dequantized"]
    assert res["fp8"]["weights"] == "fp8-resident" and deq["fp8"]["weights"] == "high-precision"
    _assert_same(res, deq)


def test_emulated_on_resident_weights_equals_emulated_after_dequantize_at_load(one_rank):
    res, deq = one_rank["emulated"]["resident"], one_rank["emulated"]["dequantized"]
    assert res["fp8"]["weight_elements_changed"] == 0 == deq["fp8"]["weight_elements_changed"]
    _assert_same(res, deq)
    assert not torch.equal(res["logits"][0], one_rank["alltoall"]["resident"]["logits"][0])


def test_default_is_bitwise_the_dequantize_at_load_path_ep2_both_dispatchers(fp8_ckpt, tmp_path):
    out = tmp_path / "ep2.pt"
    _torchrun(2, out, fp8_ckpt, 2, "alltoall,allgather")
    result = torch.load(out, weights_only=False)
    for dispatcher in ("alltoall", "allgather"):
        _assert_same(result[dispatcher]["resident"], result[dispatcher]["dequantized"])


def _raw(ckpt: Path, name: str) -> torch.Tensor:
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(ckpt / index[name], framework="pt") as f:
        return f.get_tensor(name)


def test_held_weights_are_the_checkpoints_bytes_and_scales(one_rank, fp8_ckpt):
    held = one_rank["alltoall"]["resident"]["held"]
    fc1 = held["decoder.layers.1.mlp.experts.local_experts.5.linear_fc1"]
    gate, up = (_raw(fp8_ckpt, f"model.layers.1.mlp.experts.5.{p}_proj.weight") for p in ("gate", "up"))
    scales = [_raw(fp8_ckpt, f"model.layers.1.mlp.experts.5.{p}_proj.weight_scale_inv") for p in ("gate", "up")]
    assert fc1["codes"].dtype == torch.float8_e4m3fn
    assert torch.equal(fc1["codes"].view(torch.uint8), torch.cat([gate, up]).view(torch.uint8))
    assert torch.equal(fc1["scale_inv"], torch.cat(scales))
    assert fc1["part_rows"] == [gate.shape[0], up.shape[0]] and gate.shape[0] % BLOCK[0]  # a partial block

    # rope_interleave = false: q_b_proj is held in HF row order; the row map is the loader's
    q_up = held["decoder.layers.0.self_attention.linear_q_up_proj"]
    raw = _raw(fp8_ckpt, "model.layers.0.self_attn.q_b_proj.weight")
    assert torch.equal(q_up["codes"].view(torch.uint8), raw.view(torch.uint8))
    assert torch.equal(q_up["scale_inv"], _raw(fp8_ckpt, "model.layers.0.self_attn.q_b_proj.weight_scale_inv"))
    head = 24  # qk_nope 16 + qk_rope 8 of the tiny preset
    first_head = q_up["out_index"][:head].tolist()
    assert first_head[:16] == list(range(16))
    assert first_head[16:] == [16, 20, 17, 21, 18, 22, 19, 23]  # interleave the two rope halves


def test_every_fp8_linear_costs_one_byte_per_element_plus_scales(one_rank, fp8_ckpt):
    """Bytes of every parameter and buffer of the loaded model vs the checkpoint headers."""
    cfg = json.loads((fp8_ckpt / "config.json").read_text())
    result = one_rank["alltoall"]["resident"]
    sizes, dtypes = result["bytes"], result["dtypes"]
    fp8_weights = [n for n, d in dtypes.items() if d == "torch.float8_e4m3fn"]
    assert fp8_weights and all(n.endswith(".weight") for n in fp8_weights)
    layers, dense = cfg["num_hidden_layers"], cfg["first_k_dense_replace"]
    moe = layers - dense
    # 5 attention linears per layer (q_a, q_b, kv_a, kv_b, o), dense fc1/fc2, shared and routed fc1/fc2
    expected_count = 5 * layers + 2 * dense + 2 * moe + 2 * moe * cfg["n_routed_experts"]
    assert len(fp8_weights) == expected_count
    index = json.loads((fp8_ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    in_model = [n for n in index if not n.startswith("model.layers.") or int(n.split(".")[2]) < layers]  # no MTP
    fp8_names = [n for n in in_model if n.endswith(".weight") and f"{n}_scale_inv" in index]
    total_fp8 = sum(_raw(fp8_ckpt, n).numel() for n in fp8_names)
    total_scales = sum(4 * _raw(fp8_ckpt, f"{n}_scale_inv").numel() for n in fp8_names)
    held_fp8 = sum(sizes[n] for n in fp8_weights)
    held_scales = sum(sizes[n[:-len("weight")] + "weight_scale_inv"] for n in fp8_weights)
    assert held_fp8 == total_fp8  # one byte per element
    assert held_scales == total_scales  # one fp32 per block, as stored
    # nothing else is big: row maps only where rope rows are permuted, as int64 per row
    others = {n: b for n, b in sizes.items() if n not in fp8_weights and not n.endswith("weight_scale_inv")}
    index_bytes = sum(b for n, b in others.items() if n.endswith(("fp8_out_index", "fp8_dest_rows")))
    q_rows = cfg["num_attention_heads"] * (cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"])
    kv_rows = cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]
    assert index_bytes == layers * 2 * 8 * (q_rows + kv_rows)
    non_fp8 = {n for n in in_model if n not in fp8_names and not n.endswith("_scale_inv")}
    stored_elements = sum(_raw(fp8_ckpt, n).numel() for n in non_fp8)
    runtime = ("fp8_out_index", "fp8_dest_rows", "_cached", "local_tokens_per_expert")  # not weights
    held_elements = sum(b // 4 for n, b in others.items() if not n.endswith(runtime))
    assert held_elements == stored_elements  # embedding, norms, router, bias, lm_head: as stored (fp32 here)


def test_a_linear_stored_in_bf16_is_held_as_stored(fp8_ckpt, tmp_path):
    """An FP8 checkpoint with one linear in BF16 (a vendor's modules_to_not_convert): that linear is
    held in high precision, the others FP8, and the default path still equals dequantise-at-load."""
    from megatron_easyep.checkpoint.fp8_blocks import dequantize_fp8_blockwise

    ckpt = tmp_path / "mixed"
    shutil.copytree(fp8_ckpt, ckpt)
    name = "model.layers.0.self_attn.o_proj.weight"
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = ckpt / index["weight_map"][name]
    with safe_open(shard, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    scale = tensors.pop(f"{name}_scale_inv")
    tensors[name] = dequantize_fp8_blockwise(tensors[name], scale, BLOCK, dtype=torch.bfloat16)
    save_file(tensors, shard, metadata=metadata)
    del index["weight_map"][f"{name}_scale_inv"]
    index["metadata"]["total_size"] += tensors[name].numel() - 4 * scale.numel()  # 2 bytes now, was 1 + scales
    index_path.write_text(json.dumps(index))
    out = tmp_path / "mixed.pt"
    _torchrun(1, out, ckpt, 1, "alltoall")
    result = torch.load(out, weights_only=False)
    res, deq = result["alltoall"]["resident"], result["alltoall"]["dequantized"]
    _assert_same(res, deq)
    assert "decoder.layers.0.self_attention.linear_proj" not in res["held"]
    assert res["dtypes"]["decoder.layers.0.self_attention.linear_proj.weight"] == "torch.float32"
    assert "decoder.layers.1.self_attention.linear_proj" in res["held"]


def test_triton_kernels_under_the_interpreter_match_emulated(tmp_path):
    out = tmp_path / "triton.pt"
    proc = subprocess.run([sys.executable, str(TESTS / "fp8_triton_worker.py"), str(out)], capture_output=True,
                          text=True, env={**ENV, "TRITON_INTERPRET": "1"}, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = torch.load(out, weights_only=False)
    for case in result["cases"]:
        assert case["codes_equal"] and case["scales_equal"], case
        assert case["rel"] <= 1e-6, case
    assert result["native_linear_rel"] <= 1e-6
    assert result["dequantize_weight_equal"]


def _damaged_scale(src: Path, dst: Path, name: str) -> None:
    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    shard = dst / index[name]
    with safe_open(shard, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    tensors[name] = torch.ones(tensors[name].shape[0] + 1, tensors[name].shape[1])
    save_file(tensors, shard, metadata=metadata)


def test_scale_of_the_wrong_block_grid_is_a_clear_error(fp8_ckpt, tmp_path):
    bad = tmp_path / "bad"
    name = "model.layers.1.mlp.experts.3.down_proj.weight_scale_inv"
    _damaged_scale(fp8_ckpt, bad, name)
    demos = tmp_path / "d.jsonl"
    demos.write_text(json.dumps({"input_ids": list(range(1, 20))}) + "\n")
    proc = subprocess.run([*TORCHRUN, "--nproc-per-node", "1", str(REPO / "launch" / "score.py"),
                           "--hf-checkpoint", str(bad), "--demos", str(demos), "--output", str(tmp_path / "out")],
                          capture_output=True, text=True, env=ENV, timeout=600, cwd=REPO)
    assert proc.returncode != 0
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert line, proc.stderr[-3000:]
    assert name in line[0] and "model.layers.1.mlp.experts.3.down_proj.weight " in line[0]
    with safe_open(bad / json.loads((bad / "model.safetensors.index.json").read_text())["weight_map"][name],
                   framework="pt") as f:
        bad_shape = tuple(f.get_slice(name).get_shape())
    expected = (math.ceil(64 / BLOCK[0]), math.ceil(32 / BLOCK[1]))  # down_proj is [hidden 64, moe 32]
    assert bad_shape != expected
    assert str(bad_shape) in line[0] and str(expected) in line[0] and "(64, 32)" in line[0]


def test_native_without_cuda_names_emulated(fp8_ckpt, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    demos = tmp_path / "d.jsonl"
    demos.write_text(json.dumps({"input_ids": list(range(1, 20))}) + "\n")
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "score.py"), "--hf-checkpoint", str(fp8_ckpt),
                           "--demos", str(demos), "--output", str(tmp_path / "out"), "--fp8", "native"],
                          capture_output=True, text=True, env=ENV, timeout=600, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "--fp8 emulated" in proc.stderr and "CUDA" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_cublas_blockwise_refuses_k_that_is_not_whole_groups_of_4_blocks():
    """On an H200, torch._scaled_mm block-wise with K = 1408 (11 blocks of 128) returned products off
    by 80-2400% without an error (bench/results/gpu_check_h200.json, part e): such shapes go to
    the Triton kernel, and a direct call is refused before reaching cuBLAS."""
    from megatron_easyep.mcore import fp8_gemm

    xq = torch.zeros(4, 1408, dtype=torch.float8_e4m3fn)
    wq = torch.zeros(256, 1408, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="multiple of 512"):
        fp8_gemm.scaled_mm_blockwise(xq, torch.ones(4, 11), wq, torch.ones(2, 11), torch.bfloat16)
    assert not fp8_gemm.scaled_mm_blockwise_ok(torch.device("cpu"), (128, 128), 256, 2048)
