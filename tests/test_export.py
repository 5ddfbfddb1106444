"""Streaming pruned export, checked against stock transformers and the source bytes.

The oracle for a pruned checkpoint is the ORIGINAL checkpoint loaded in transformers with the
pruned experts removed from routing: its routers are replaced (in this file, written
independently of megatron_easyep) by one that gives pruned experts a -inf choice score and then
applies the group rule the pruned config declares. For equal-per-group the pruned groups are the
kept experts of each original group, so the oracle groups by the original blocks; for collapse it
routes ungrouped top-k over the kept experts. Tensor bytes are compared through the safetensors
library, not through the exporter's own header code.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_oracle import load_transformers_model, load_transformers_mtp, read_checkpoint_tensors
from megatron_easyep.pruning.export import ExportError, export_pruned
from megatron_easyep.checkpoint.reader import DeepseekV3Config
from megatron_easyep.checkpoint.io import write_score_file
from megatron_easyep.pruning.selection import Selection, SelectionError, load_scores, select_for_checkpoint
from megatron_easyep.checkpoint.tiny import make_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
E, N_GROUP = 16, 4
KEEP = 8
MTP_LAYER = 3  # tiny preset: 3 decoder layers, MTP layer index = num_hidden_layers


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------


def _scores(config: DeepseekV3Config, layers, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Group 0 and 1 favoured: the global top-8 is uneven across the 4 routing groups, so collapse
    # and equal-per-group keep different experts (and a regrouping bug would change routing).
    group_bonus = torch.tensor([3.0, 1.5, 0.0, 0.0], dtype=torch.float64).repeat_interleave(E // N_GROUP)
    rows = lambda: torch.rand(len(layers), E, generator=g, dtype=torch.float64) * 3 + group_bonus  # noqa: E731
    return {"easyep": rows(), "easyep@math": rows(), "easyep@code": rows(), "gate": rows()}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """bf16 and FP8 tiny checkpoints with an MTP layer, each with a score file without an MTP
    row (the fallback rule) and one with an MTP row."""
    root = tmp_path_factory.mktemp("sources")
    result = {}
    for kind in ("bf16", "fp8"):
        extra = dict(fp8=True, weight_block_size=[16, 16]) if kind == "fp8" else {}
        src = make_tiny_checkpoint(root / kind, "tiny", num_nextn_predict_layers=1, seed=0, **extra)
        config = DeepseekV3Config.load(src)
        moe = config.moe_layer_ids
        write_score_file(root / f"{kind}-scores", _scores(config, moe, 5), moe, config.config_hash, ["math", "code"])
        with_mtp = [*moe, MTP_LAYER]
        write_score_file(
            root / f"{kind}-scores-mtp", _scores(config, with_mtp, 6), with_mtp, config.config_hash, ["math", "code"]
        )
        result[kind] = {"src": src, "config": config, "scores": root / f"{kind}-scores",
                        "scores_mtp": root / f"{kind}-scores-mtp"}
    return result


@functools.cache
def _original_model(src: str):
    return load_transformers_model(src)


def selection_for(source, scores_key="scores", **kw) -> Selection:
    args = dict(keep=KEEP, metric="easyep", domains=["math", "code"])
    args.update(kw)
    return select_for_checkpoint(load_scores(source[scores_key]), source["config"], **args)


def tree_digest(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


# --------------------------------------------------------------------------------------------
# the oracle: original model, pruned experts removed from routing
# --------------------------------------------------------------------------------------------


def masked_router_forward(router, kept, n_group, topk_group, hidden_states):
    """DeepSeek-V3 routing over the ORIGINAL router with pruned experts at -inf choice score."""
    num_experts, hidden = router.weight.shape
    x = hidden_states.reshape(-1, hidden).to(torch.float32)
    logits = x @ router.weight.to(torch.float32).T
    scores = torch.sigmoid(logits)
    choice = scores + router.e_score_correction_bias.to(torch.float32)
    allowed = torch.zeros(num_experts, dtype=torch.bool)
    allowed[list(kept)] = True
    choice = choice.masked_fill(~allowed, float("-inf"))
    if n_group > 1:
        size = num_experts // n_group
        group_score = choice.view(-1, n_group, size).topk(2, dim=-1).values.sum(-1)
        chosen_groups = group_score.topk(topk_group, dim=-1).indices
        group_ok = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, chosen_groups, True)
        choice = choice.masked_fill(~group_ok.repeat_interleave(size, dim=1), float("-inf"))
    index = choice.topk(router.top_k, dim=-1).indices
    weights = scores.gather(1, index)
    weights = weights / (weights.sum(-1, keepdim=True) + 1e-20) * router.routed_scaling_factor
    return logits, weights, index


def route_only_kept(moe_modules: dict[int, torch.nn.Module], kept: dict[int, tuple], n_group, topk_group):
    for layer, moe in moe_modules.items():
        moe.gate.forward = functools.partial(masked_router_forward, moe.gate, kept[layer], n_group, topk_group)


def restore_routing(moe_modules):
    for moe in moe_modules.values():
        moe.gate.__dict__.pop("forward", None)


INPUT_IDS = torch.randint(4, 512, (2, 12), generator=torch.Generator().manual_seed(0))
MTP_HIDDEN = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(1))
POSITIONS = torch.arange(12)[None].expand(2, 12)


@torch.no_grad()
def main_logits(model):
    return model(INPUT_IDS).logits


@torch.no_grad()
def mtp_logits(mtp):
    return mtp._project_to_logits(mtp.forward_layer(0, MTP_HIDDEN, POSITIONS, None, input_ids=INPUT_IDS))


# --------------------------------------------------------------------------------------------
# must show: loads in stock transformers, logits equal the masked-routing oracle
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["equal-per-group", "collapse"])
@pytest.mark.parametrize("kind", ["bf16", "fp8"])
def test_pruned_logits_equal_masked_routing_oracle(sources, tmp_path, kind, policy):
    source = sources[kind]
    selection = selection_for(source, group_policy=policy)
    per_group = {layer: [sum(1 for i in ids if i // 4 == g) for g in range(N_GROUP)]
                 for layer, ids in selection.kept.items()}
    if policy == "collapse":
        assert any(counts != [2, 2, 2, 2] for counts in per_group.values()), "test scores should be uneven"
    else:
        assert all(counts == [2, 2, 2, 2] for counts in per_group.values())
    assert selection.fallback_layers == (MTP_LAYER,)

    dst = export_pruned(source["src"], tmp_path / "pruned", selection).path
    # stock from_pretrained, no trust_remote_code: no missing / mismatched keys, only the MTP
    # layer's tensors unexpected (transformers silences only layer 61)
    pruned = load_transformers_model(dst)
    assert all(k.startswith(f"model.layers.{MTP_LAYER}.") for k in pruned._oracle_unexpected_keys)
    assert pruned.config.n_routed_experts == KEEP
    pruned_moe = {layer: pruned.model.layers[layer].mlp for layer in source["config"].moe_layer_ids}
    assert all(moe.gate.weight.shape[0] == KEEP for moe in pruned_moe.values())

    original = _original_model(str(source["src"]))
    original_moe = {layer: original.model.layers[layer].mlp for layer in source["config"].moe_layer_ids}
    unpruned = main_logits(original)
    grouping = (N_GROUP, 2) if policy == "equal-per-group" else (1, 1)
    try:
        route_only_kept(original_moe, selection.kept, *grouping)
        expected = main_logits(original)
        if policy == "equal-per-group":  # the group rule matters: ungrouped routing differs
            route_only_kept(original_moe, selection.kept, 1, 1)
            assert (main_logits(original) - expected).abs().max() > 1e-3
    finally:
        restore_routing(original_moe)
    actual = main_logits(pruned)
    assert (actual - expected).abs().max().item() <= 1e-5
    assert (actual - unpruned).abs().max().item() > 1e-3, "pruning should change routing"

    # MTP layer: pruned with the fallback ids, it must act as the original masked the same way
    original_mtp, pruned_mtp = load_transformers_mtp(original), load_transformers_mtp(pruned)
    original_mtp_moe = {MTP_LAYER: original_mtp.layers[0].mtp_block.mlp}
    assert pruned_mtp.layers[0].mtp_block.mlp.gate.weight.shape[0] == KEEP
    try:
        route_only_kept(original_mtp_moe, selection.kept, *grouping)
        expected_mtp = mtp_logits(original_mtp)
    finally:
        restore_routing(original_mtp_moe)
    assert (mtp_logits(pruned_mtp) - expected_mtp).abs().max().item() <= 1e-5


# --------------------------------------------------------------------------------------------
# bytes, config, index, records
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bf16", "fp8"])
def test_keeping_all_experts_is_byte_identical(sources, tmp_path, kind):
    source = sources[kind]
    dst = export_pruned(source["src"], tmp_path / "all", selection_for(source, keep=E)).path
    before, after = read_checkpoint_tensors(source["src"]), read_checkpoint_tensors(dst)
    assert sorted(before) == sorted(after)
    if kind == "fp8":
        assert any(t.dtype == torch.float8_e4m3fn for t in after.values())
        assert any(name.endswith("weight_scale_inv") for name in after)
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and after[name].shape == tensor.shape, name
        assert raw_bytes(after[name]) == raw_bytes(tensor), name
    assert json.loads((dst / "config.json").read_text()) == json.loads((source["src"] / "config.json").read_text())
    src_index = json.loads((source["src"] / "model.safetensors.index.json").read_text())
    dst_index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert dst_index == src_index


def test_single_file_source(tmp_path):
    """A checkpoint without index (one model.safetensors) exports to an indexed one."""
    src = make_tiny_checkpoint(tmp_path / "single", "tiny", num_shards=1, seed=3)
    config = DeepseekV3Config.load(src)
    rows = torch.rand(2, E, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    write_score_file(tmp_path / "scores", {"gate": rows}, config.moe_layer_ids, config.config_hash, [])
    selection = select_for_checkpoint(load_scores(tmp_path / "scores"), config, keep=E, metric="gate")
    dst = export_pruned(src, tmp_path / "out", selection).path
    before, after = read_checkpoint_tensors(src), read_checkpoint_tensors(dst)
    assert sorted(before) == sorted(after)
    assert all(raw_bytes(before[n]) == raw_bytes(after[n]) for n in before)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model.safetensors"}


def _check_config_matches_tensors(dst: Path):
    """Every MoE / MTP layer the config declares has exactly n_routed_experts experts, a router
    of that many rows and an fp32 bias; no tensor belongs to an undeclared layer."""
    config = json.loads((dst / "config.json").read_text())
    tensors = read_checkpoint_tensors(dst)
    experts, layers = config["n_routed_experts"], config["num_hidden_layers"]
    declared = layers + config.get("num_nextn_predict_layers", 0)
    present = {int(name.split(".")[2]) for name in tensors if name.startswith("model.layers.")}
    assert present == set(range(declared))
    for layer in range(config["first_k_dense_replace"], declared):
        prefix = f"model.layers.{layer}.mlp."
        assert tensors[prefix + "gate.weight"].shape[0] == experts
        bias = tensors[prefix + "gate.e_score_correction_bias"]
        assert bias.shape == (experts,) and bias.dtype == torch.float32
        ids = {int(n[len(prefix) + 8 :].split(".")[0]) for n in tensors if n.startswith(prefix + "experts.")}
        assert ids == set(range(experts))
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    return config, tensors


def test_pruned_fp8_tensors_are_sliced_copies(sources, tmp_path):
    source = sources["fp8"]
    src = source["src"]
    digest_before = tree_digest(src)
    selection = selection_for(source, group_policy="collapse", domain_weights=[1.0, 2.0])
    report = export_pruned(src, tmp_path / "pruned", selection)
    dst = report.path
    assert tree_digest(src) == digest_before, "the source must never be modified"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary sibling left behind"

    config, out = _check_config_matches_tensors(dst)
    original = read_checkpoint_tensors(src)
    expected_names = set()
    for name, tensor in original.items():
        parts = name.split(".")
        layer = int(parts[2]) if name.startswith("model.layers.") else None
        if layer in selection.kept and parts[4] == "experts":
            old = int(parts[5])
            if old not in selection.kept[layer]:
                continue
            new_name = ".".join([*parts[:5], str(selection.kept[layer].index(old)), *parts[6:]])
            expected = tensor  # FP8 weight or its fp32 scale, byte for byte
        elif layer in selection.kept and parts[4] == "gate":
            new_name, expected = name, tensor[list(selection.kept[layer])]
        else:
            new_name, expected = name, tensor
        expected_names.add(new_name)
        assert out[new_name].dtype == expected.dtype and out[new_name].shape == expected.shape, new_name
        assert raw_bytes(out[new_name]) == raw_bytes(expected), new_name
    assert expected_names == set(out)
    assert out["model.layers.1.mlp.experts.0.up_proj.weight"].dtype == torch.float8_e4m3fn
    assert "model.layers.1.mlp.experts.7.up_proj.weight_scale_inv" in out

    src_config = json.loads((src / "config.json").read_text())
    assert list(config) == list(src_config), "key order must be kept"
    changed = {k for k in config if config[k] != src_config[k]}
    assert changed == {"n_routed_experts", "n_group", "topk_group"}
    assert (config["n_routed_experts"], config["n_group"], config["topk_group"]) == (KEEP, 1, 1)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (dst / name).read_bytes() == (src / name).read_bytes()

    pruning = json.loads((dst / "pruning.json").read_text())
    assert pruning["kept_experts"] == {str(k): list(v) for k, v in selection.kept.items()}
    assert pruning["source"]["config_hash"] == source["config"].config_hash
    assert pruning["scores_sha256"] == hashlib.sha256((source["scores"] / "scores.safetensors").read_bytes()).hexdigest()
    assert (pruning["metric"], pruning["domains"], pruning["domain_weights"]) == ("easyep", ["math", "code"], [1.0, 2.0])
    assert (pruning["group_policy"], pruning["keep"]) == ("collapse", KEEP)
    assert pruning["mtp"]["action"] == "prune" and pruning["mtp"]["rule"][str(MTP_LAYER)].startswith("fallback")
    preflight = json.loads((dst / "preflight.json").read_text())
    assert preflight["megatron_ep_sizes"] == [1, 2, 4, 8]
    assert preflight["checks"]["sglang_fast_routing_kernel"]["ok"] is True
    assert preflight["checks"]["vllm_dsv3_router_gemm_fast_path"]["ok"] is False


def test_mtp_scored_row_is_used(sources, tmp_path):
    source = sources["bf16"]
    selection = selection_for(source, "scores_mtp", domains=None, metric="gate")
    assert selection.fallback_layers == ()
    row = load_scores(source["scores_mtp"]).rows("gate")[-1].tolist()
    expected = sorted(i for g in range(N_GROUP)
                      for i in sorted(range(4 * g, 4 * g + 4), key=lambda i: (-row[i], i))[:2])
    assert list(selection.kept[MTP_LAYER]) == expected
    dst = export_pruned(source["src"], tmp_path / "pruned", selection).path
    config, _ = _check_config_matches_tensors(dst)
    assert config["num_nextn_predict_layers"] == 1
    assert json.loads((dst / "pruning.json").read_text())["mtp"]["rule"] == {str(MTP_LAYER): "scored"}


def test_mtp_drop(sources, tmp_path):
    from transformers import AutoModelForCausalLM

    source = sources["bf16"]
    dst = export_pruned(source["src"], tmp_path / "pruned", selection_for(source), mtp="drop").path
    config, tensors = _check_config_matches_tensors(dst)
    assert config["num_nextn_predict_layers"] == 0
    assert not [n for n in tensors if n.startswith(f"model.layers.{MTP_LAYER}.")]
    model, info = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    assert json.loads((dst / "pruning.json").read_text())["mtp"]["action"] == "drop"


# --------------------------------------------------------------------------------------------
# output safety and bad input: a clear error, and nothing created
# --------------------------------------------------------------------------------------------


def _refused(call, parent: Path, error=ValueError, match=None):
    before = sorted(p.name for p in parent.iterdir())
    with pytest.raises(error, match=match):
        call()
    assert sorted(p.name for p in parent.iterdir()) == before, "nothing may be created on error"


def test_bad_input_is_refused_before_any_output(sources, tmp_path):
    source = sources["bf16"]
    src, config = source["src"], source["config"]
    good = selection_for(source)
    dst = tmp_path / "out"

    _refused(lambda: selection_for(source, keep=E + 1), tmp_path, SelectionError, "larger than the 16")
    _refused(lambda: selection_for(source, keep=6), tmp_path, SelectionError, "not a multiple of n_group")
    _refused(lambda: selection_for(source, metric="easyep_no_norm"), tmp_path, SelectionError, "unknown metric")
    _refused(lambda: selection_for(source, domains=["law"]), tmp_path, SelectionError, "unknown domain")
    other = sources["fp8"]["config"]  # a different checkpoint: its config hash differs
    _refused(lambda: select_for_checkpoint(load_scores(source["scores"]), other, keep=KEEP, metric="easyep"),
             tmp_path, SelectionError, "different checkpoint")

    wrong_hash = Selection(**{**good.__dict__, "config_hash": "f" * 64})
    _refused(lambda: export_pruned(src, dst, wrong_hash), tmp_path, ExportError, "different checkpoint")
    # kept experts uneven across groups while the config keeps n_group=4: would silently regroup
    uneven = {layer: tuple(range(KEEP)) for layer in good.kept}
    _refused(lambda: export_pruned(src, dst, Selection(**{**good.__dict__, "kept": uneven})),
             tmp_path, ExportError, "regroup")
    no_mtp = {layer: ids for layer, ids in good.kept.items() if layer != MTP_LAYER}
    _refused(lambda: export_pruned(src, dst, Selection(**{**good.__dict__, "kept": no_mtp})),
             tmp_path, ExportError, r"no kept experts for layer\(s\) \[3\]")
    _refused(lambda: export_pruned(src, dst, good, mtp="keep"), tmp_path, ExportError, "unknown MTP action")

    src_before = tree_digest(src)
    _refused(lambda: export_pruned(src, src, good, overwrite=True), src.parent, ExportError, "is the source")
    _refused(lambda: export_pruned(src, src / "pruned", good), src, ExportError, "inside the source")
    assert tree_digest(src) == src_before
    _refused(lambda: export_pruned(src, src.parent, good, overwrite=True), src.parent.parent, ExportError,
             "is inside the output")

    dst.mkdir()
    (dst / "keep-me").write_text("user data")
    _refused(lambda: export_pruned(src, dst, good), dst, ExportError, "already exists")
    assert (dst / "keep-me").read_text() == "user data"
    export_pruned(src, dst, good, overwrite=True)
    assert not (dst / "keep-me").exists() and (dst / "config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _cli(*args):
    return subprocess.run(
        [sys.executable, str(REPO / "converters" / "export_pruned.py"), *map(str, args)],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_cli(sources, tmp_path):
    source = sources["fp8"]
    dst = tmp_path / "cli-out"
    run = _cli("--hf-checkpoint", source["src"], "--scores", source["scores"], "--output", dst,
               "--keep-ratio", "0.5", "--metric", "easyep", "--domains", "math,code", "--domain-weights", "1,2",
               "--group-policy", "equal-per-group", "--target-ep", "4", "--mtp", "prune")
    assert run.returncode == 0, run.stderr
    assert "sglang_fast_routing_kernel" in run.stdout and "EP sizes dividing E': [1, 2, 4, 8]" in run.stdout
    pruning = json.loads((dst / "pruning.json").read_text())
    assert pruning["keep"] == KEEP and pruning["domain_weights"] == [1.0, 2.0]
    expected = selection_for(source, domain_weights=[1.0, 2.0])
    assert pruning["kept_experts"] == {str(k): list(v) for k, v in expected.kept.items()}
    assert json.loads((dst / "preflight.json").read_text())["n_routed_experts"] == KEEP

    # errors: exit code 2, the problem named on stderr, no output directory
    wrong = sources["bf16"]["scores"]  # scores of another checkpoint
    for args, message in [
        (("--scores", wrong, "--keep", "8", "--metric", "easyep"), "different checkpoint"),
        (("--scores", source["scores"], "--keep", "8", "--metric", "loudness"), "unknown metric 'loudness'"),
    ]:
        failed = _cli("--hf-checkpoint", source["src"], "--output", tmp_path / "nothing", *args)
        assert failed.returncode == 2 and message in failed.stderr, failed.stderr
        assert not (tmp_path / "nothing").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli-out"]
