"""Megatron-Core (our loader, real torchrun ranks) vs stock transformers DeepseekV3: logits.

Where the two routers agree, and why the fixtures stay there:
  * group score: DeepSeek/transformers sum each group's top-2 choice scores; stock Megatron sums
    the top (top_k // topk_group). mcore.compat.routing installs the top-2 rule where it differs, so the
    `group_top1` checkpoint (top_k / topk_group = 4) matches too; see test_group_rule_*.
  * masked groups: DeepSeek's own modeling code (and transformers 4.x, vLLM's python router)
    fill unselected groups with 0.0; Megatron and transformers 5.23 with -inf. They pick the
    same experts while every choice score sigmoid(x) + bias is positive, which the tiny
    checkpoints guarantee (bias >= 0); see test_group_masking_*.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_oracle import load_transformers_model
from megatron_easyep.mcore.compat import routing as megatron_routing
from megatron_easyep.checkpoint.reader import HFCheckpoint

REPO = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
REL_TOL = 1e-4

CHECKPOINTS = {
    # n_group 4 / topk_group 2 / top-4, q_lora_rank set, yarn rope, bf16
    "groups": dict(),
    # FP8 with non-square 32x16 blocks (many partial blocks), q_lora_rank null, no groups,
    # MTP layer present (ignored by the forward), two dense layers, half-split rope
    # (rope_interleave false: the loader permutes q_proj / kv_a rope rows)
    "fp8_flat": dict(fp8=True, weight_block_size=[32, 16], q_lora_rank=None, n_group=1,
                     topk_group=1, num_nextn_predict_layers=1, first_k_dense_replace=2,
                     num_hidden_layers=4, rope_interleave=False),
    # top_k / topk_group = 4: only DeepSeek's top-2 group score matches transformers;
    # half-split rope through q_b_proj
    "group_top1": dict(n_group=4, topk_group=1, num_experts_per_tok=4, rope_interleave=False),
}

DEMOS = [[3, 17, 92, 45, 201, 7, 66, 311, 12, 5, 480, 33],
         [100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111, 112, 113, 114, 115, 116,
          117, 118, 119, 120, 121, 122, 123, 124, 125, 126, 127, 128, 129, 130],
         [9, 8, 7]]


@pytest.fixture(scope="module")
def parity_checkpoints(tiny_checkpoint_factory):
    return {name: tiny_checkpoint_factory(**kw) for name, kw in CHECKPOINTS.items()}


@pytest.fixture(scope="module")
def demos_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("parity") / "ids.jsonl"
    path.write_text("".join(json.dumps({"input_ids": ids}) + "\n" for ids in DEMOS))
    return path


def _run_worker(out: Path, nproc: int, ep: int, dispatcher: str, demos: Path, ckpts: dict):
    out.mkdir(parents=True, exist_ok=True)
    cmd = TORCHRUN + [f"--nproc-per-node={nproc}", "--standalone",
                      str(REPO / "tests" / "parity_worker.py"), str(out), str(ep), dispatcher,
                      str(demos)] + [f"{n}={p}" for n, p in ckpts.items()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env=os.environ | {"PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


LAYOUTS = {"ep1_alltoall": (1, 1, "alltoall"), "ep2_alltoall": (2, 2, "alltoall"),
           "ep2_allgather": (2, 2, "allgather")}


@pytest.fixture(scope="module")
def megatron_runs(tmp_path_factory, parity_checkpoints, demos_file):
    root = tmp_path_factory.mktemp("megatron_runs")
    return {layout: _run_worker(root / layout, nproc, ep, disp, demos_file, parity_checkpoints)
            for layout, (nproc, ep, disp) in LAYOUTS.items()}


@pytest.fixture(scope="module")
def transformers_logits(parity_checkpoints):
    out = {}
    for name, ckpt in parity_checkpoints.items():
        model = load_transformers_model(ckpt, torch.float32)
        with torch.no_grad():
            out[name] = [model(torch.tensor([ids])).logits[0] for ids in DEMOS]
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_logits_match_transformers(megatron_runs, transformers_logits, name, layout):
    ours = load_file(str(megatron_runs[layout] / f"{name}.safetensors"))
    assert list(ours) == [f"demo_{i}" for i in range(len(DEMOS))]
    for i, reference in enumerate(transformers_logits[name]):
        got = ours[f"demo_{i}"]
        assert got.dtype == torch.float32 and got.shape == reference.shape
        scale = reference.abs().max().item()
        err = (got - reference).abs().max().item()
        assert err <= REL_TOL * scale, f"{name} {layout} demo {i}: |diff| {err:.3g}, scale {scale:.3g}"


def test_each_ep_rank_reads_only_its_experts(megatron_runs, parity_checkpoints):
    """EP=2: rank r reads experts r*E/2 .. (r+1)*E/2-1 of every MoE layer and every replicated
    tensor; nothing else. Byte counts add up to the checkpoint minus the other rank's experts."""
    ckpt = HFCheckpoint(parity_checkpoints["groups"])
    num_experts = ckpt.config.n_routed_experts
    expert_names = [n for n in ckpt.names() if ".mlp.experts." in n]
    replicated = {n for n in ckpt.names() if ".mlp.experts." not in n}
    reads = [json.loads((megatron_runs["ep2_alltoall"] / f"groups.reads.rank{r}.json").read_text())
             for r in range(2)]
    for rank, read in enumerate(reads):
        names = set(read["names"])
        assert len(names) == len(read["names"]), "a tensor was read twice"
        experts_read = {int(n.split(".mlp.experts.")[1].split(".")[0]) for n in names
                        if ".mlp.experts." in n}
        mine = set(range(rank * num_experts // 2, (rank + 1) * num_experts // 2))
        assert experts_read == mine
        assert names == replicated | {n for n in expert_names
                                      if int(n.split(".mlp.experts.")[1].split(".")[0]) in mine}
        expected_bytes = sum(ckpt.read_raw(n).numel() * ckpt.read_raw(n).element_size()
                             for n in names)
        assert read["bytes"] == expected_bytes
    # the two ranks together read each expert exactly once
    all_expert_reads = [n for r in reads for n in r["names"] if ".mlp.experts." in n]
    assert sorted(all_expert_reads) == sorted(expert_names)


def _transformers_mean_nll(ckpt) -> tuple[float, int]:
    """Mean next-token NLL of DEMOS under stock transformers (fp32), and the token count."""
    model = load_transformers_model(ckpt, torch.float32)
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in DEMOS:
            logits = model(torch.tensor([ids])).logits[0]
            total += torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]),
                                                       reduction="sum").item()
            count += len(ids) - 1
    return total / count, count


def test_evaluate_cli_reports_perplexity(parity_checkpoints, demos_file, tmp_path):
    """The documented entry point itself (2 ranks, EP=2, allgather): NLL equals the one computed
    from transformers' logits."""
    logits_file = tmp_path / "logits.safetensors"
    cmd = TORCHRUN + ["--nproc-per-node=2", "--standalone", str(REPO / "launch" / "evaluate.py"),
                      "--hf-checkpoint", str(parity_checkpoints["groups"]),
                      "--demos", f"{demos_file}:ids", "--expert-parallel", "2",
                      "--dispatcher", "allgather", "--dump-logits", str(logits_file),
                      "--json", str(tmp_path / "eval.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    row = next(line.split() for line in proc.stdout.splitlines() if line.startswith("ids"))
    nll, count = _transformers_mean_nll(parity_checkpoints["groups"])
    assert int(row[1]) == count
    assert float(row[2]) == pytest.approx(nll, rel=1e-4)
    assert logits_file.exists()
    saved = json.loads((tmp_path / "eval.json").read_text())["results"]["ids"]
    assert saved["tokens"] == count
    assert saved["nll"] == pytest.approx(nll, rel=1e-4)
    assert saved["ppl"] == pytest.approx(math.exp(nll), rel=1e-4)


def test_evaluate_baseline_column(parity_checkpoints, demos_file, tmp_path):
    """--baseline prints the baseline's ppl and the relative change: a hand-made baseline at
    twice the true perplexity gives -50.0%; a domain missing from it gives '-'; an unreadable
    baseline exits 2 before loading the model."""
    ckpt = parity_checkpoints["groups"]
    nll, count = _transformers_mean_nll(ckpt)
    ppl = math.exp(nll)
    baseline = tmp_path / "base.json"
    baseline.write_text(json.dumps({"format": "megatron-easyep-eval/1",
                                    "results": {"ids": {"tokens": count, "nll": 0, "ppl": 2 * ppl}}}))
    cmd = [sys.executable, str(REPO / "launch" / "evaluate.py"), "--hf-checkpoint", str(ckpt),
           "--demos", f"{demos_file}:ids", "--demos", f"{demos_file}:other", "--baseline", str(baseline)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()}
    assert float(rows["ids"][4]) == pytest.approx(2 * ppl, rel=1e-3)
    assert rows["ids"][5] == "-50.0%"
    assert rows["other"][4:] == ["-", "-"]

    baseline.write_text("{not json")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "--baseline" in proc.stderr and str(baseline) in proc.stderr and "Traceback" not in proc.stderr


# --- the group rule, on small synthetic routers ------------------------------------------------

def _hf_style_route(choice: torch.Tensor, top_k: int, n_group: int, topk_group: int):
    """DeepSeek's reference router: group score = sum of top-2, unselected groups masked with
    0.0 (transformers 5.23 masks with -inf instead)."""
    t, e = choice.shape
    group_scores = choice.view(t, n_group, -1).topk(2, dim=-1)[0].sum(-1)
    group_idx = group_scores.topk(topk_group, dim=-1, sorted=False)[1]
    mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    mask = mask.unsqueeze(-1).expand(t, n_group, e // n_group).reshape(t, e)
    return choice.masked_fill(~mask.bool(), 0.0).topk(top_k, dim=-1)[1]


def _stock_megatron_route(choice, top_k, n_group, topk_group):
    t, e = choice.shape
    group_scores = choice.view(t, n_group, -1).topk(top_k // topk_group, dim=-1)[0].sum(-1)
    group_idx = group_scores.topk(topk_group, dim=-1, sorted=False)[1]
    mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    mask = mask.unsqueeze(-1).expand(t, n_group, e // n_group).reshape(t, e)
    return choice.masked_fill(~mask.bool(), float("-inf")).topk(top_k, dim=-1)[1]


def _ours(choice, top_k, n_group, topk_group):
    t, e = choice.shape
    return megatron_routing.deepseek_group_limited_topk(choice, top_k, t, e, n_group, topk_group)[1]


def _same_sets(a, b):
    return torch.equal(a.sort(dim=-1)[0], b.sort(dim=-1)[0])


def test_group_masking_agrees_with_positive_choices():
    torch.manual_seed(0)
    choice = torch.rand(512, 32) + 0.01  # sigmoid + non-negative bias: all positive
    for top_k, n_group, topk_group in [(8, 8, 4), (4, 4, 2), (4, 4, 1), (6, 8, 3)]:
        assert _same_sets(_ours(choice, top_k, n_group, topk_group),
                          _hf_style_route(choice, top_k, n_group, topk_group))


def test_group_rule_fixes_stock_megatron_when_topk_per_group_is_not_two():
    torch.manual_seed(1)
    choice = torch.rand(512, 32) + 0.01
    # top_k / topk_group == 2: stock Megatron already agrees
    assert _same_sets(_stock_megatron_route(choice, 8, 8, 4), _hf_style_route(choice, 8, 8, 4))
    # top_k / topk_group == 4: stock Megatron routes differently, ours does not
    stock = _stock_megatron_route(choice, 4, 4, 1)
    hf = _hf_style_route(choice, 4, 4, 1)
    assert not _same_sets(stock, hf)
    assert _same_sets(_ours(choice, 4, 4, 1), hf)


def test_group_masking_differs_with_negative_choices():
    """Documents the one place the rules part: negative choice scores (strongly negative
    correction bias). A 0.0 mask can then pick an expert of an unselected group."""
    choice = torch.tensor([[-0.5, -0.6, -0.1, -0.2, -0.9, -0.8, -0.7, -0.95]])
    ours = _ours(choice, 2, 4, 1)
    hf = _hf_style_route(choice, 2, 4, 1)
    assert set(ours[0].tolist()) == {2, 3}  # only the best group
    assert not _same_sets(ours, hf)


@pytest.mark.parametrize("breakage, expected", [
    ("missing_shard", "model-00002-of-00003.safetensors"),
    ("unsupported_architecture", "LlamaForCausalLM"),
    ("scale_removed", "_scale_inv"),
])
def test_evaluate_cli_refuses_bad_checkpoints(tiny_checkpoint_factory, demos_file, tmp_path,
                                              breakage, expected):
    """The entry point turns a broken checkpoint into one clear line and exit 2."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = tiny_checkpoint_factory(fp8=True) if breakage == "scale_removed" else tiny_checkpoint_factory()
    ckpt = tmp_path / "ckpt"
    shutil.copytree(src, ckpt)
    if breakage == "missing_shard":
        (ckpt / "model-00002-of-00003.safetensors").unlink()
    elif breakage == "unsupported_architecture":
        config = json.loads((ckpt / "config.json").read_text())
        config["architectures"] = ["LlamaForCausalLM"]
        (ckpt / "config.json").write_text(json.dumps(config))
    else:  # an FP8 weight whose scale_inv is gone from its shard and from the index
        index = json.loads((ckpt / "model.safetensors.index.json").read_text())
        name = next(n for n in index["weight_map"] if n.endswith("o_proj.weight_scale_inv"))
        shard = ckpt / index["weight_map"].pop(name)
        tensors = load_file(str(shard))
        del tensors[name]
        save_file(tensors, str(shard), metadata={"format": "pt"})
        (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "evaluate.py"), "--hf-checkpoint",
                           str(ckpt), "--demos", str(demos_file)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert error and expected in error[-1], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
