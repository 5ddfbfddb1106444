"""Emulated DeepSeek FP8 (megatron_easyep.mcore.fp8_emulation): hand-computed e4m3 quantisation of known
blocks, --fp8 mode resolution, and the real Megatron-Core model with the emulation enabled
(tests/fp8_emulation_worker.py, one subprocess for the whole file).

e4m3 (float8_e4m3fn) facts used below: 3 mantissa bits, so [2^e, 2^(e+1)) holds 8 codes spaced
2^(e-3); largest 448; smallest subnormal 2^-9; round to nearest, ties to even; no inf.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_easyep.mcore import fp8_emulation as fe
from megatron_easyep.checkpoint.fp8_blocks import MIN_BLOCK_AMAX

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "fp8_emulation_worker.py"


# --------------------------------------------------------------------------------------------
# 1. hand-computed quantisation
# --------------------------------------------------------------------------------------------

def test_activation_groups_by_hand():
    """A 1x256 activation = two 128-wide groups. Group 0 has amax 448 (scale exactly 1, so the
    values are rounded onto the e4m3 grid itself); group 1 has amax 6 (scale 6/448)."""
    x = torch.zeros(1, 256)
    group0 = {  # value -> e4m3 value (scale 1)
        0: (448.0, 448.0),          # the amax maps to the largest code
        1: (1.0625, 1.0),           # halfway between 1.0 and 1.125: tie -> even mantissa (1.0)
        2: (1.07, 1.125),           # nearer 1.125 (step 1/8 in [1, 2))
        3: (0.3, 0.3125),           # [0.25, 0.5) has step 1/32: 9.6 steps -> 10 -> 0.3125
        4: (2.0**-9, 2.0**-9),      # smallest subnormal, exact
        5: (2.0**-11, 0.0),         # below half the smallest subnormal -> 0
        6: (-300.0, -288.0),        # [256, 448] step 32: 300 is nearer 288 than 320
        7: (240.0, 240.0),          # 1.875 * 2^7, exact
        8: (17.0, 16.0),            # [16, 32) step 2: tie between 16 (even) and 18 (odd) -> 16
        9: (0.001, 2.0**-9),        # subnormal step 2^-9 = 0.00195: 0.512 steps -> 1 step
        10: (1.0, 1.0),             # exact here; the same 1.0 in group 1 is not (below)
    }
    group1 = {  # scale 6/448 = 3/224: q = value * 224/3, then dequantised q * 3/224
        128: (6.0, 6.0),            # amax -> code 448 -> 448 * 6/448
        129: (1.0, 72 * 6 / 448),   # 74.67 in [64, 128) step 8 -> 72 -> 0.9642857
        130: (-0.5, -36 * 6 / 448),  # 37.33 in [32, 64) step 4 -> 36 -> -0.4821429
        131: (0.0, 0.0),
    }
    for col, (value, _) in {**group0, **group1}.items():
        x[0, col] = value
    q, scale = fe.quantize_activation(x, 128)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (1, 256)
    assert scale.shape == (1, 2)
    assert scale[0, 0].item() == 1.0
    assert scale[0, 1].item() == pytest.approx(6 / 448, rel=1e-7)
    # codes of group 0 are the e4m3 values themselves (scale 1)
    for col, (_, expected) in group0.items():
        assert q[0, col].float().item() == expected, col
    assert q[0, 128].float().item() == 448.0 and q[0, 129].float().item() == 72.0
    assert q[0, 130].float().item() == -36.0

    y = fe.fake_quantize_activation(x, 128)
    assert y.dtype == x.dtype and y.shape == x.shape
    for col, (_, expected) in {**group0, **group1}.items():
        assert y[0, col].item() == pytest.approx(expected, rel=1e-6, abs=0), col
    untouched = sorted(set(range(256)) - set(group0) - set(group1))
    assert torch.count_nonzero(y[0, untouched]) == 0


def test_activation_groups_are_per_token_and_partial_last_group():
    # two tokens with different amax in the same group; K = 10 with groups of 4 -> 4, 4, 2
    x = torch.tensor([[448.0, 1.07, 0, 0, 7.0, 0.3, 0, 0, 1.0, 0.0],
                      [7.0, 1.07, 0, 0, 0, 0, 0, 0, 3.5, 1.2]])
    q, scale = fe.quantize_activation(x, 4)
    assert scale.shape == (2, 3)
    expected_scale = torch.tensor([[1.0, 7 / 448, 1 / 448], [7 / 448, MIN_BLOCK_AMAX / 448, 3.5 / 448]])
    torch.testing.assert_close(scale, expected_scale, rtol=1e-7, atol=0)
    y = fe.dequantize_activation(q, scale, 4)
    # token 1, group 0: scale 1/64 -> 1.07 * 64 = 68.48 -> step 8 -> 72 -> 1.125
    # token 0, group 1: scale 1/64 -> 0.3 * 64 = 19.2 -> step 2 -> 20 -> 0.3125
    # token 1, group 2: scale 1/128 -> 1.2 * 128 = 153.6 -> [128, 256) step 16 -> 160 -> 1.25
    expected = torch.tensor([[448.0, 1.125, 0, 0, 7.0, 0.3125, 0, 0, 1.0, 0.0],
                             [7.0, 1.125, 0, 0, 0, 0, 0, 0, 3.5, 1.25]])
    torch.testing.assert_close(y, expected, rtol=1e-7, atol=0)
    # leading dims are kept ([s, b, h] as Megatron passes them) and bf16 stays bf16
    y3 = fe.fake_quantize_activation(x.view(2, 1, 10).bfloat16(), 4)
    assert y3.shape == (2, 1, 10) and y3.dtype == torch.bfloat16


def test_weight_blocks_by_hand():
    """4 x 6 weight, (2, 4) blocks: a full 2x4 block, a partial 2x2 edge block, an all-zero block."""
    w = torch.zeros(4, 6)
    w[0, 0], w[0, 1], w[1, 2] = 448.0, 1.07, -300.0            # block (0,0): amax 448, scale 1
    w[0, 4], w[0, 5], w[1, 4], w[1, 5] = 0.5, 0.25, 0.3, -0.1  # block (0,1): amax 0.5, scale 1/896
    #                                                            block (1,0): all zero
    w[2, 4], w[3, 5] = 3.0, 1.0                                 # block (1,1): amax 3, scale 3/448
    expected = torch.zeros(4, 6)
    expected[0, 0], expected[0, 1], expected[1, 2] = 448.0, 1.125, -288.0
    expected[0, 4] = 0.5                 # 448
    expected[0, 5] = 0.25                # 0.25 * 896 = 224, exact
    expected[1, 4] = 256 / 896           # 268.8 in [256, 448] step 32 -> 256
    expected[1, 5] = -88 / 896           # 89.6 in [64, 128) step 8 -> 88
    expected[2, 4] = 3.0
    expected[3, 5] = 144 * 3 / 448       # 149.3 in [128, 256) step 16 -> 144
    got = fe.fake_quantize_weight(w, (2, 4))
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=0)
    assert torch.isfinite(got).all()
    # bf16 in, bf16 out; quantising twice changes nothing (values are on the grid)
    assert fe.fake_quantize_weight(w.bfloat16(), (2, 4)).dtype == torch.bfloat16
    assert torch.equal(fe.fake_quantize_weight(got, (2, 4)), got)


def test_bad_group_and_block_sizes_are_refused():
    with pytest.raises(ValueError, match="group size"):
        fe.quantize_activation(torch.ones(2, 4), 0)
    with pytest.raises(ValueError, match="block_size"):
        fe.fake_quantize_weight(torch.ones(2, 4), (0, 4))


# --------------------------------------------------------------------------------------------
# 2. --fp8 mode resolution
# --------------------------------------------------------------------------------------------

def test_resolve_fp8_mode_on_this_machine():
    usable, reason = fe.transformer_engine_status()
    assert fe.resolve_fp8_mode("none") == "none"
    assert fe.resolve_fp8_mode(None) == "none"
    assert fe.resolve_fp8_mode("emulated") == "emulated"
    native = fe.native_fp8_status() is None  # a CUDA GPU with FP8 tensor cores
    assert fe.resolve_fp8_mode("auto") == ("native" if native else "emulated")
    assert fe.resolve_fp8_mode("auto", fp8_weights_resident=False) == "emulated"
    if usable:  # a Hopper GPU with Transformer Engine
        assert fe.resolve_fp8_mode("te") == "te"
        return
    assert reason
    with pytest.raises(fe.Fp8Unavailable, match="--fp8 emulated") as info:
        fe.resolve_fp8_mode("te")
    assert reason in str(info.value)
    assert isinstance(info.value, ValueError)  # launch/_cli.run_main turns it into "error: ..."


def test_resolve_fp8_mode_decisions_given_a_te_status():
    ok, missing = (True, "TE on H800 (sm90)"), (False, "no CUDA GPU is visible")
    assert fe.resolve_fp8_mode("te", ok) == "te"
    assert fe.resolve_fp8_mode("emulated", ok) == "emulated"
    assert fe.resolve_fp8_mode("emulated", ok) == "emulated"  # explicit request wins
    with pytest.raises(fe.Fp8Unavailable, match="no CUDA GPU is visible"):
        fe.resolve_fp8_mode("te", missing)
    with pytest.raises(ValueError, match="choose one of none, auto, emulated, native, te"):
        fe.resolve_fp8_mode("fp8", ok)


def test_auto_is_native_where_supported_otherwise_the_exact_path():
    """--fp8 auto: real FP8 GEMMs when the GPU has FP8 tensor cores and the checkpoint's FP8 weights
    are held FP8-resident; otherwise emulation (never Transformer Engine, which the local spec
    cannot use)."""
    te_ok = (True, "TE on H800 (sm90)")
    no_gpu = "--fp8 native runs real FP8 GEMMs and needs a CUDA GPU"
    assert fe.resolve_fp8_mode("auto", te_ok, native_status=None) == "native"
    assert fe.resolve_fp8_mode("AUTO", native_status=None, fp8_weights_resident=False) == "emulated"
    assert fe.resolve_fp8_mode("auto", te_ok, native_status=no_gpu) == "emulated"
    assert fe.resolve_fp8_mode("native", native_status=None) == "native"
    with pytest.raises(fe.Fp8Unavailable, match="needs a CUDA GPU"):
        fe.resolve_fp8_mode("native", native_status=no_gpu)


# --------------------------------------------------------------------------------------------
# 3. the real Megatron-Core model
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def worker_result(tiny_checkpoint_factory, tmp_path_factory):
    bf16 = tiny_checkpoint_factory()
    # blocks that do not divide the tiny shapes: partial edge blocks everywhere, and gate/up
    # blocks that differ from blocks of Megatron's concatenated linear_fc1
    fp8 = tiny_checkpoint_factory(fp8=True, weight_block_size=[24, 16])
    # rope_interleave = false: the loader permutes q_up rows; 20-row blocks straddle the permutation
    base = tiny_checkpoint_factory(fp8=True, weight_block_size=[20, 16])
    nonint = tmp_path_factory.mktemp("fp8_nonint") / "checkpoint"
    shutil.copytree(base, nonint)
    config = json.loads((nonint / "config.json").read_text())
    config["rope_interleave"] = False
    (nonint / "config.json").write_text(json.dumps(config))

    out = tmp_path_factory.mktemp("fp8_worker") / "result.pt"
    proc = subprocess.run([sys.executable, str(WORKER), str(out), str(bf16), str(fp8), str(nonint)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out)


def _expected_fp8_modules(num_layers=3, first_dense=1, experts=16):
    names = []
    for layer in range(num_layers):
        p = f"decoder.layers.{layer}"
        names += [f"{p}.self_attention.{n}" for n in ("linear_q_down_proj", "linear_q_up_proj",
                                                       "linear_kv_down_proj", "linear_kv_up_proj",
                                                       "linear_proj")]
        if layer < first_dense:
            names += [f"{p}.mlp.linear_fc1", f"{p}.mlp.linear_fc2"]
        else:
            names += [f"{p}.mlp.shared_experts.linear_fc1", f"{p}.mlp.shared_experts.linear_fc2"]
            names += [f"{p}.mlp.experts.local_experts.{e}.{n}" for e in range(experts)
                      for n in ("linear_fc1", "linear_fc2")]
    return sorted(names)


def test_exactly_the_attention_and_expert_linears_are_quantised(worker_result):
    expected = _expected_fp8_modules()
    assert sorted(worker_result["modules"]) == expected  # tiny preset: 3 layers, 1 dense, 16 experts
    # every quantised weight changed (bf16 checkpoint values are not on the e4m3 grid) and no other
    # parameter did: router, expert bias, embedding, output layer and norms stay high precision
    assert worker_result["changed_params"] == sorted(n + ".weight" for n in expected)
    assert worker_result["state"]["weight_elements_changed"] > 0.9 * worker_result["state"]["weight_elements"]


def test_emulated_forward_differs_a_little_from_fp32(worker_result):
    ref, fp8 = worker_result["logits_ref"], worker_result["logits_fp8"]
    rel = ((fp8 - ref).norm() / ref.norm()).item()
    # e4m3 keeps 3 mantissa bits (relative step 2^-3): a random tiny model moves by a few tens of
    # percent at most (routing flips amplify it); it must move, and it must not be garbage.
    assert 1e-3 < rel < 0.5, rel
    assert (ref.argmax(-1) == fp8.argmax(-1)).float().mean() >= 0.5
    # removing the activation hooks keeps the quantised weights: in between the two
    weights_only = worker_result["logits_weights_only"]
    assert not torch.equal(weights_only, ref) and not torch.equal(weights_only, fp8)
    assert worker_result["attribute_cleared"]


def _reference_fake_quant_weight(w, rows_per_tensor, block=(128, 128)):
    """Independent: explicit loop over the blocks of each HF tensor (gate / up separately)."""
    out = torch.empty_like(w)
    start = 0
    for rows in rows_per_tensor:
        part = w[start:start + rows]
        for i in range(0, part.shape[0], block[0]):
            for j in range(0, part.shape[1], block[1]):
                b = part[i:i + block[0], j:j + block[1]]
                scale = max(b.abs().max().item(), MIN_BLOCK_AMAX) / 448.0
                scale = torch.tensor(scale, dtype=torch.float32)
                q = (b / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
                out[start + i:start + i + b.shape[0], j:j + b.shape[1]] = q.float() * scale
        start += rows
    return out


def _reference_fake_quant_activation(x, group=128):
    flat = x.reshape(-1, x.shape[-1])
    out = torch.empty_like(flat)
    for t in range(flat.shape[0]):
        for j in range(0, flat.shape[1], group):
            g = flat[t, j:j + group]
            scale = torch.tensor(max(g.abs().max().item(), MIN_BLOCK_AMAX) / 448.0, dtype=torch.float32)
            out[t, j:j + group] = (g / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale
    return out.reshape(x.shape)


def test_one_linear_equals_a_plain_torch_reference(worker_result):
    captures = worker_result["captures"]
    assert len(captures) == 3
    for name, c in captures.items():
        x, w, y = c["x"], c["w"], c["y"]
        assert x.shape[0] > 0, name  # the chosen expert received tokens
        gated = name.endswith("linear_fc1")
        rows = [w.shape[0] // 2] * 2 if gated else [w.shape[0]]
        y_ref = _reference_fake_quant_activation(x) @ _reference_fake_quant_weight(w, rows).T
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6, msg=name)
        # and the reference discriminates: the unquantised product is far outside the tolerance
        y_plain = x @ w.T
        assert (y_plain - y).abs().max() > 100 * (1e-6 + 1e-5 * y.abs().max()), name
        if gated:  # quantising Megatron's concatenated [gate; up] as one tensor would differ
            y_joint = _reference_fake_quant_activation(x) @ _reference_fake_quant_weight(w, [w.shape[0]]).T
            assert not torch.allclose(y_joint, y, rtol=1e-5, atol=1e-6), name


def test_fp8_checkpoint_weights_are_already_representable(worker_result):
    for key in ("fp8", "fp8_noninterleaved"):
        state = worker_result[key]["state"]
        assert state["linear_modules"] == len(_expected_fp8_modules())
        assert state["weight_elements_changed"] == 0, key
        assert worker_result[key]["changed_params"] == [], key
    assert worker_result["fp8"]["state"]["weight_block_size"] == [24, 16]
    assert worker_result["fp8"]["state"]["activation_group_size"] == 16
    # without hf_config the rope-permuted q_up rows are quantised in the wrong blocks
    assert worker_result["fp8_noninterleaved"]["changed_without_hf_config"] > 0


def test_round_trip_of_a_weight_block_at_every_scale():
    """The property the checkpoint test relies on, on many random blocks and magnitudes:
    dequantised FP8 weights re-quantise to the same values (codes and scales)."""
    g = torch.Generator().manual_seed(0)
    for exponent in range(-12, 8, 3):
        w = torch.randn(96, 80, generator=g) * 2.0**exponent
        once = fe.fake_quantize_weight(w, (32, 16))
        assert torch.equal(fe.fake_quantize_weight(once, (32, 16)), once), exponent
        # half the largest step (32 in [256, 448]) relative to the block amax (448)
        assert 0 < (once - w).abs().max() <= 16 / 448 * w.abs().max() * 1.0001


def test_score_cli_fp8_flag(tiny_checkpoint_factory, tmp_path):
    """--fp8 through launch/score.py: `emulated` leaves an FP8 checkpoint's weights exactly as
    stored, moves the scores a little (activations are quantised), and is recorded; `te` without
    Transformer Engine is one clear error and exit 2."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    from megatron_easyep.scoring.demo_data import write_demo_files

    repo = Path(__file__).resolve().parent.parent
    ckpt = tiny_checkpoint_factory(fp8=True, weight_block_size=[32, 32])
    demos = write_demo_files(tmp_path / "demos", per_domain=3, heldout=1)
    outputs = {}
    for mode in ("none", "emulated", "te"):
        out = tmp_path / f"scores_{mode}"
        proc = subprocess.run([sys.executable, str(repo / "launch" / "score.py"), "--hf-checkpoint",
                               str(ckpt), "--demos", f"{demos['math']}:math", "--output", str(out),
                               "--fp8", mode], capture_output=True, text=True, timeout=600)
        outputs[mode] = (proc, out)
    for mode in ("none", "emulated"):
        assert outputs[mode][0].returncode == 0, outputs[mode][0].stderr[-3000:]
    te_proc, te_out = outputs["te"]
    assert te_proc.returncode == 2 and "--fp8 te" in te_proc.stderr and not te_out.exists()
    info = json.loads((outputs["emulated"][1] / "scores.json").read_text())
    assert info["fp8"]["mode"] == "emulated" and info["fp8"]["weight_elements_changed"] == 0
    plain = load_file(str(outputs["none"][1] / "scores.safetensors"))["easyep"]
    emulated = load_file(str(outputs["emulated"][1] / "scores.safetensors"))["easyep"]
    rel = ((plain - emulated).abs().max() / plain.abs().max()).item()
    assert 0 < rel < 0.5, rel
