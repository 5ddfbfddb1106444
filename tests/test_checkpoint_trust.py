"""Checkpoint trust: an index that lies is refused at open, scores travel between the FP8 original
and its BF16 copy (same architecture, other storage format), a run that fails before it starts
leaves no OUTPUT.inprogress, and converters/fp8_to_bf16.py writes the BF16 copy.

Oracles: transformers' DeepseekV3ForCausalLM state dict (which tensors a model needs), safetensors
read directly (bytes that must pass through), an explicit block loop (dequantisation), and a run
that was not interrupted (resume)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from faults import run_then_kill, snapshot_for_every_rank
from hf_oracle import dequantize_blockwise_reference
from megatron_easyep.checkpoint.inventory import expected_tensors
from megatron_easyep.checkpoint.reader import CheckpointError, DeepseekV3Config, HFCheckpoint
from megatron_easyep.checkpoint.tiny import build_config

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
SCORE = str(REPO / "launch" / "score.py")
EXPORT = str(REPO / "converters" / "export_pruned.py")
TO_BF16 = str(REPO / "converters" / "fp8_to_bf16.py")
INDEX = "model.safetensors.index.json"
BLOCK = [32, 32]  # smaller than the tiny matrices, so scales are real grids
KEEP = 8


def _run(cmd, **env_extra):
    env = {k: v for k, v in os.environ.items() if k != "EASYEP_ALLOW_UNEXPECTED_TENSORS"}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **env_extra)
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


def _error_line(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert lines, f"no error line (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[-1]


def _score(ckpt, demos, output, *args, **env):
    return _run([PYTHON, SCORE, "--hf-checkpoint", ckpt, "--demos", demos, "--output", output, *args], **env)


def _export(ckpt, scores, output, *args):
    return _run([PYTHON, EXPORT, "--hf-checkpoint", ckpt, "--scores", scores, "--output", output,
                 "--keep", KEEP, "--metric", "easyep", *args])


def _ok(proc, what):
    assert proc.returncode == 0, f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"


@pytest.fixture(scope="module")
def demos(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("demos") / "demos.jsonl"
    gen = torch.Generator().manual_seed(0)
    lines = [json.dumps({"input_ids": torch.randint(4, 400, (10 + 3 * i,), generator=gen).tolist()}) for i in range(6)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def fp8_ckpt(tiny_checkpoint_factory) -> Path:
    return tiny_checkpoint_factory(fp8=True, weight_block_size=BLOCK, num_nextn_predict_layers=1)


@pytest.fixture(scope="module")
def bf16_copy(fp8_ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bf16") / "copy"
    proc = _run([PYTHON, TO_BF16, "--hf-checkpoint", fp8_ckpt, "--output", out])
    _ok(proc, "fp8_to_bf16")
    return out


def _copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def _index(path: Path) -> dict:
    return json.loads((path / INDEX).read_text())


# --------------------------------------------------------------------------------------------
# 1. which tensors a model needs: transformers' own state dict is the oracle
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [{}, {"q_lora_rank": None, "n_shared_experts": 0},
                                       {"tie_word_embeddings": True, "num_nextn_predict_layers": 1}])
def test_required_tensors_are_transformers_state_dict(overrides):
    from transformers import DeepseekV3Config as HFConfig, DeepseekV3ForCausalLM

    raw = build_config("tiny", **overrides)
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(HFConfig(**raw))
    hf_names = set()
    for name, tensor in model.state_dict().items():
        # transformers 5 fuses routed experts ([E, ...] per layer); checkpoints store them one by one
        prefix, fused, kind = name.rpartition(".experts.")
        if tensor.numel() == 0:  # n_shared_experts 0: transformers builds empty shared experts
            continue
        if not fused or "." in kind:
            hf_names.add(name)
            continue
        projs = ("gate_proj", "up_proj") if kind == "gate_up_proj" else (kind,)
        hf_names |= {f"{prefix}.experts.{e}.{p}.weight" for e in range(tensor.shape[0]) for p in projs}
    expected = expected_tensors(DeepseekV3Config.from_dict(raw))
    assert expected.required <= hf_names
    # a tied lm_head is in the state dict (it is the embedding) but not needed on disk
    assert hf_names - expected.required <= ({"lm_head.weight"} if raw["tie_word_embeddings"] else set())
    assert not expected.optional & expected.required


# --------------------------------------------------------------------------------------------
# 2. an index that lies
# --------------------------------------------------------------------------------------------

EXTRA = "model.layers.2.mlp.experts.99.up_proj.weight"  # 16 experts: there is no expert 99


def _lie(case: str, path: Path) -> tuple[str, str]:
    """Damage the copy at `path`; returns (tensor, file) the error must name."""
    index = _index(path)
    wm = index["weight_map"]
    if case == "extra_entry":
        wm[EXTRA] = wm["model.layers.2.mlp.experts.3.up_proj.weight"]
        named = (EXTRA, wm[EXTRA])
    elif case == "wrong_shard":
        name = "model.layers.1.mlp.experts.5.down_proj.weight"
        wm[name] = next(s for s in sorted(set(wm.values())) if s != wm[name])
        named = (name, wm[name])
    elif case == "shard_tensor_not_in_index":
        name = "model.layers.2.mlp.gate.e_score_correction_bias"
        named = (name, wm.pop(name))
    elif case == "wrong_total_size":
        index["metadata"]["total_size"] += 4096
        named = ("total_size", INDEX)
    elif case == "unexpected_tensor_in_shard":  # index and shard agree, the config does not
        shard = path / wm["model.layers.2.mlp.experts.3.up_proj.weight"]
        tensors = load_file(shard)
        tensors[EXTRA] = tensors["model.layers.2.mlp.experts.3.up_proj.weight"].clone()
        save_file(tensors, str(shard), metadata={"format": "pt"})
        wm[EXTRA] = shard.name
        index["metadata"]["total_size"] += tensors[EXTRA].numel() * tensors[EXTRA].element_size()
        named = (EXTRA, shard.name)
    else:
        raise AssertionError(case)
    (path / INDEX).write_text(json.dumps(index))
    return named


LIES = ["extra_entry", "wrong_shard", "shard_tensor_not_in_index", "wrong_total_size", "unexpected_tensor_in_shard"]


@pytest.mark.parametrize("case", LIES)
def test_lying_index_is_refused_by_export(case, fp8_ckpt, tmp_path):
    src = _copy(fp8_ckpt, tmp_path / "src")
    tensor, file = _lie(case, src)
    scores = tmp_path / "scores"
    _write_scores_for(src, scores)
    proc = _export(src, scores, tmp_path / "out")
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _error_line(proc)
    assert tensor in line and file in line, line
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_lying_index_is_refused_by_scoring_and_leaves_nothing(fp8_ckpt, demos, tmp_path):
    src = _copy(fp8_ckpt, tmp_path / "src")
    tensor, file = _lie("extra_entry", src)
    proc = _score(src, demos, tmp_path / "out")
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _error_line(proc)
    assert tensor in line and file in line, line
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.inprogress").exists()


def test_unexpected_tensor_escape_hatch(fp8_ckpt, tmp_path):
    src = _copy(fp8_ckpt, tmp_path / "src")
    _lie("unexpected_tensor_in_shard", src)
    with pytest.raises(CheckpointError, match=EXTRA.replace(".", r"\.")):
        HFCheckpoint(src)
    assert HFCheckpoint(src, allow_unexpected=True).unexpected == [EXTRA]
    # index entries that disagree with the shards are not vendor extras: no escape
    other = _copy(fp8_ckpt, tmp_path / "other")
    _lie("extra_entry", other)
    with pytest.raises(CheckpointError, match="does not hold it"):
        HFCheckpoint(other, allow_unexpected=True)


def test_score_cli_escape_hatch_flag(fp8_ckpt, demos, tmp_path):
    """launch/score.py refuses a vendor extra by default and takes it with --allow-unexpected-tensors."""
    src = _copy(fp8_ckpt, tmp_path / "src")
    _lie("unexpected_tensor_in_shard", src)
    refused = _score(src, demos, tmp_path / "refused")
    assert refused.returncode == 2 and EXTRA in _error_line(refused)
    _ok(_score(src, demos, tmp_path / "taken", "--allow-unexpected-tensors"), "score with the flag")
    assert (tmp_path / "taken" / "scores.safetensors").is_file()


def _write_scores_for(ckpt: Path, out: Path) -> None:
    """A score file as an older scoring run of `ckpt` wrote it (config_hash only)."""
    from megatron_easyep.checkpoint.io import write_score_file

    config = DeepseekV3Config.load(ckpt)
    layers = config.moe_layer_ids
    rows = torch.arange(len(layers) * config.n_routed_experts, dtype=torch.float64).reshape(len(layers), -1)
    write_score_file(out, {"easyep": rows}, layers, config.config_hash, [])


# --------------------------------------------------------------------------------------------
# 3. the BF16 copy: conversion, and scores that travel between the two storage formats
# --------------------------------------------------------------------------------------------

def test_bf16_copy_is_the_dequantised_original(fp8_ckpt, bf16_copy):
    src_index, dst_index = _index(fp8_ckpt)["weight_map"], _index(bf16_copy)["weight_map"]
    assert set(dst_index) == {n for n in src_index if not n.endswith("_scale_inv")}
    config = json.loads((bf16_copy / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == "bfloat16"
    total = 0
    for name, shard in src_index.items():
        if name.endswith("_scale_inv"):
            continue
        with safe_open(fp8_ckpt / shard, "pt") as f:
            stored = f.get_tensor(name)
            scale = f.get_tensor(name + "_scale_inv") if stored.dtype == torch.float8_e4m3fn else None
        with safe_open(bf16_copy / dst_index[name], "pt") as f:
            copied = f.get_tensor(name)
        total += copied.numel() * copied.element_size()
        if scale is None:  # copied byte for byte: the fp32 bias stays fp32
            assert copied.dtype == stored.dtype and torch.equal(copied, stored), name
        else:
            expected = dequantize_blockwise_reference(stored, scale, BLOCK).to(torch.bfloat16)
            assert copied.dtype == torch.bfloat16 and torch.equal(copied, expected), name
    assert _index(bf16_copy)["metadata"]["total_size"] == total
    assert (bf16_copy / "tokenizer.json").read_bytes() == (fp8_ckpt / "tokenizer.json").read_bytes()
    a, b = DeepseekV3Config.load(fp8_ckpt), DeepseekV3Config.load(bf16_copy)
    assert a.architecture_hash == b.architecture_hash and a.config_hash != b.config_hash


def test_bf16_converter_refuses_a_bf16_source(bf16_copy, tmp_path):
    proc = _run([PYTHON, TO_BF16, "--hf-checkpoint", bf16_copy, "--output", tmp_path / "again"])
    assert proc.returncode == 2 and "quantization_config" in _error_line(proc)
    assert not (tmp_path / "again").exists()


@pytest.fixture(scope="module")
def scored(fp8_ckpt, bf16_copy, demos, tmp_path_factory):
    """{"bf16": score dir of the BF16 copy, "fp8": of the FP8 original}, by launch/score.py."""
    root = tmp_path_factory.mktemp("scored")
    out = {}
    for name, ckpt in (("bf16", bf16_copy), ("fp8", fp8_ckpt)):
        proc = _score(ckpt, demos, root / name)
        _ok(proc, f"scoring the {name} checkpoint")
        out[name] = root / name
    return out


def _expert_bytes(ckpt: Path, name: str) -> bytes:
    shard = _index(ckpt)["weight_map"][name]
    with safe_open(ckpt / shard, "pt") as f:
        return f.get_tensor(name).contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("scored_on, pruned", [("bf16", "fp8"), ("fp8", "bf16")])
def test_scores_prune_the_other_storage_format(scored, fp8_ckpt, bf16_copy, tmp_path, scored_on, pruned):
    ckpts = {"fp8": fp8_ckpt, "bf16": bf16_copy}
    info = json.loads((scored[scored_on] / "scores.json").read_text())
    assert info["architecture_hash"] == DeepseekV3Config.load(ckpts[pruned]).architecture_hash
    assert info["config_hash"] != DeepseekV3Config.load(ckpts[pruned]).config_hash

    out = tmp_path / "pruned"
    proc = _export(ckpts[pruned], scored[scored_on], out)
    _ok(proc, "export")
    notes = [ln for ln in proc.stderr.splitlines() if "same model, other storage format" in ln]
    assert len(notes) == 1, proc.stderr[-3000:]
    words = {"fp8": "fp8 e4m3 (32x32 blocks)", "bf16": "bfloat16"}
    assert f"on a {words[scored_on]} copy" in notes[0] and f"stores {words[pruned]}" in notes[0]

    pruning = json.loads((out / "pruning.json").read_text())
    assert pruning["identity_note"] == notes[0]
    quantised = {"fp8": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": BLOCK}, "bf16": None}
    assert pruning["source"]["storage_format"]["quantization"] == quantised[pruned]
    assert pruning["scores_checkpoint"]["storage_format"]["quantization"] == quantised[scored_on]
    # the pruned copy keeps the source's storage: kept experts' bytes (FP8 + scale, or BF16) pass through
    for layer, ids in pruning["kept_experts"].items():
        for new, old in enumerate(ids[:3]):
            for suffix in ("weight", "weight_scale_inv") if pruned == "fp8" else ("weight",):
                src_name = f"model.layers.{layer}.mlp.experts.{old}.down_proj.{suffix}"
                dst_name = f"model.layers.{layer}.mlp.experts.{new}.down_proj.{suffix}"
                assert _expert_bytes(out, dst_name) == _expert_bytes(ckpts[pruned], src_name)
    assert ("quantization_config" in json.loads((out / "config.json").read_text())) == (pruned == "fp8")


def test_scores_of_another_architecture_still_fail(scored, fp8_ckpt, tmp_path):
    other = DeepseekV3Config.from_dict(build_config("tiny", fp8=False, hidden_size=96))
    for name, edit in (("other_hidden_size", {"config_hash": other.config_hash,
                                              "architecture_hash": other.architecture_hash}),
                       ("old_score_file", {"architecture_hash": None})):  # config_hash only: strict
        scores = _copy(scored["bf16"], tmp_path / name)
        info = json.loads((scores / "scores.json").read_text())
        info.update(edit)
        info = {k: v for k, v in info.items() if v is not None}
        (scores / "scores.json").write_text(json.dumps(info))
        proc = _export(fp8_ckpt, scores, tmp_path / f"out_{name}")
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "different checkpoint" in _error_line(proc)
        assert not (tmp_path / f"out_{name}").exists()


# --------------------------------------------------------------------------------------------
# 4. no litter: a failed start leaves no OUTPUT.inprogress; a killed run keeps it and resumes
# --------------------------------------------------------------------------------------------

def _break(case: str, path: Path) -> str:
    """Break the copy at `path`; returns what the error must name."""
    wm = _index(path)["weight_map"]
    if case == "missing_shard":
        shard = sorted(set(wm.values()))[1]
        (path / shard).unlink()
        return shard
    if case == "truncated_shard":
        shard = path / sorted(set(wm.values()))[2]
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) - 1000])
        return shard.name
    if case == "missing_scale":  # gone from its shard and from the index
        name = "model.layers.1.mlp.experts.2.gate_proj.weight_scale_inv"
        index = _index(path)
        shard = path / index["weight_map"].pop(name)
        tensors = load_file(shard)
        del tensors[name]
        save_file(tensors, str(shard), metadata={"format": "pt"})
        (path / INDEX).write_text(json.dumps(index))
        return name
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing_shard", "truncated_shard", "missing_scale"])
def test_failed_start_leaves_no_inprogress(case, fp8_ckpt, demos, tmp_path):
    src = _copy(fp8_ckpt, tmp_path / "src")
    named = _break(case, src)
    proc = _score(src, demos, tmp_path / "out")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert named in _error_line(proc)
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "out.inprogress").exists(), sorted(p.name for p in (tmp_path / "out.inprogress").iterdir())


def test_killed_run_keeps_inprogress_and_resumes(scored, bf16_copy, demos, tmp_path):
    out = tmp_path / "out"
    args = ("--checkpoint-every", "1")
    env = {k: v for k, v in os.environ.items() if k != "EASYEP_ALLOW_UNEXPECTED_TENSORS"}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    # SIGKILL from outside once the step-2 snapshot is announced
    killed = run_then_kill([PYTHON, SCORE, "--hf-checkpoint", bf16_copy, "--demos", demos, "--output", out, *args],
                           ready=snapshot_for_every_rank(tmp_path / "out.inprogress", 1, min_step=2), env=env,
                           cwd=REPO, timeout=300)
    assert killed.killed, f"the run ended (exit {killed.returncode}) before it could be killed:\n{killed.stderr[-3000:]}"
    assert killed.returncode != 0 and not out.exists()
    kept = sorted(p.name for p in (tmp_path / "out.inprogress").iterdir())
    assert "run.json" in kept and any(n.startswith("state_rank0_step") for n in kept), kept
    assert "--resume continues" in killed.stderr
    resumed = _score(bf16_copy, demos, out, *args, "--resume")
    _ok(resumed, "--resume")
    assert int(resumed.stderr.split("resuming at step ", 1)[1].split("/")[0]) >= 2, resumed.stderr[-2000:]
    assert not (tmp_path / "out.inprogress").exists()
    got, ref = load_file(out / "scores.safetensors"), load_file(scored["bf16"] / "scores.safetensors")
    assert set(got) == set(ref)
    for key in ref:  # the uninterrupted run of the same checkpoint and demos
        assert torch.equal(got[key], ref[key]), key
