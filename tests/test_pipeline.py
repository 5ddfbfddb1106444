"""Pipeline parallelism: `torchrun launch/score.py --pipeline-parallel 2` against one process
(PP = 1), uneven stages, micro-batches, PP x EP on 4 ranks, resume, per-stage reads and logits
(tests/pipeline_worker.py), and bad layouts refused before any weight is read.

Every launch starts once per session on a pool of two worker threads (two cores); tests wait only
for the launches they read.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from faults import run_then_kill, snapshot_for_every_rank
from megatron_easyep.checkpoint.reader import DeepseekV3Config
from megatron_easyep.mcore import plan

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
SCORE = str(REPO / "launch" / "score.py")
WORKER = str(REPO / "tests" / "pipeline_worker.py")
EVALUATE = str(REPO / "launch" / "evaluate.py")
TIMEOUT = 420
DOMAINS = ["math", "code"]

MATH = [("What is 3 + 2?", "3 + 2 = 5. The answer is 5."),
        ("Let x = 7. What is x^2?", "Then x^2 = 49 and sqrt(49) = 7. So x^2 = 49."),
        ("Compute 17 * 11 step by step.", "17 * 11 = 170 + 17 = 187. The answer is 187."),
        ("Is 24 + 38 = 62?", "Yes, 24 + 38 = 62.")]
CODE = [("Write a loop.", "for i in range(10):\n    print(i)\n"),
        ("Load a JSON config.", 'with open("config.json") as f:\n    config = json.load(f)\n'),
        ("Dot product in C.", "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }")]  # 7 demos: odd

# name: (nproc, extra arguments)
LAUNCHES = {
    "pp1": (0, []),
    "pp2": (2, ["--pipeline-parallel", 2]),                       # default split: 2 + 1 layers
    "pp2_layout12_micro": (2, ["--pipeline-parallel", 2, "--pipeline-layout", "1,2",
                               "--micro-batch-tokens", 120]),
    "pp2_ep2": (4, ["--pipeline-parallel", 2, "--expert-parallel", 2]),
    # C-Prune features: one process, one demo per forward vs PP=2 x EP=2 with packed micro-batches
    "pp1_cprune": (0, ["--cprune-features"]),
    "pp2_ep2_micro_cprune": (4, ["--pipeline-parallel", 2, "--expert-parallel", 2,
                                 "--micro-batch-tokens", 120, "--cprune-features"]),
}
RESUME_ARGS = ["--pipeline-parallel", 2, "--checkpoint-every", 1, "--micro-batches-per-step", 1]


def _env(**extra):
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **extra)
    return env


def _launcher(nproc):
    return [TORCHRUN, "--standalone", f"--nproc-per-node={nproc}"] if nproc else [PYTHON]


def _score_cmd(nproc, ckpt, demos, output, *args):
    cmd = _launcher(nproc) + [SCORE, "--hf-checkpoint", str(ckpt), "--output", str(output)]
    for spec in demos:
        cmd += ["--demos", spec]
    return cmd + [str(a) for a in args]


def _run(cmd, **env):
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=_env(**env), timeout=TIMEOUT)


def _check(proc, what):
    assert proc.returncode == 0, f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint_factory):
    return tiny_checkpoint_factory()


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("pp_demos")
    files = []
    for domain, rows in (("math", MATH), ("code", CODE)):
        path = root / f"{domain}.jsonl"
        path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in rows))
        files.append(f"{path}:{domain}")
    return files


def _bad_cases():
    """name -> (extra args, words the error line must contain)."""
    return {
        "pp_not_dividing_world": (["--pipeline-parallel", 2], ["--pipeline-parallel 2", "world size 1"]),
        "layout_not_adding_up": (["--pipeline-parallel", 1, "--pipeline-layout", "1"],
                                 ["--pipeline-layout", "adds up to 1", "num_hidden_layers=3"]),
        "layout_wrong_stage_count": (["--pipeline-parallel", 2, "--pipeline-layout", "1,1,1"],
                                     ["--pipeline-layout", "3 stages", "--pipeline-parallel is 2"]),
        "pp_larger_than_layers": (["--pipeline-parallel", 4], ["--pipeline-parallel 4", "num_hidden_layers=3"]),
        # control: a good layout on the same checkpoint fails at the first weight read, which
        # proves the cases above were refused before any weight was read
        "control_reads_weights": ([], ["model-00001-of-00003.safetensors", "does not exist"]),
    }


@pytest.fixture(scope="module")
def launches(ckpt, demo_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("pp_scores")
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)

    def plain(name):
        nproc, args = LAUNCHES[name]
        output = root / name
        return output, _run(_score_cmd(nproc, ckpt, demo_files, output, *args))

    def resume():
        output = root / "resumed"
        cmd = _score_cmd(2, ckpt, demo_files, output, *RESUME_ARGS)
        work = output.with_name(output.name + ".inprogress")
        # SIGKILL the whole torchrun tree once both stages have a snapshot (as a lost node would)
        killed = run_then_kill(cmd, ready=snapshot_for_every_rank(work, 2), env=_env(), cwd=REPO, timeout=TIMEOUT)
        inprogress = sorted(p.name for p in work.glob("*"))
        return output, killed, inprogress, _run(cmd + ["--resume"])

    def worker():
        out = root / "worker"
        out.mkdir()
        return out, _run(_launcher(2) + [WORKER, str(out), str(ckpt), "2,1", "1,2"])

    def evaluate(nproc, *args):
        output = root / f"eval_{nproc}"
        output.mkdir()
        cmd = _launcher(nproc) + [EVALUATE, "--hf-checkpoint", str(ckpt), "--dump-logits",
                                  str(output / "logits.safetensors"), "--json", str(output / "eval.json")]
        for spec in demo_files:
            cmd += ["--demos", spec]
        return output, _run(cmd + [str(a) for a in args])

    def bad():
        # the checkpoint without its weight files: config, tokenizer and index only
        broken = root / "no_weights"
        shutil.copytree(ckpt, broken, ignore=shutil.ignore_patterns("*.safetensors"))
        procs = {}
        for name, (args, _) in _bad_cases().items():
            output = root / f"bad_{name}"
            procs[name] = (subprocess.Popen(_score_cmd(0, broken, demo_files, output, *args),
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                            cwd=REPO, env=_env()), output)
        return {name: (proc.wait(TIMEOUT), proc.stderr.read(), output) for name, (proc, output) in procs.items()}

    futures = {"resume": pool.submit(resume), "pp2_ep2": pool.submit(plain, "pp2_ep2"),
               "pp2_ep2_micro_cprune": pool.submit(plain, "pp2_ep2_micro_cprune")}
    futures["worker"] = pool.submit(worker)
    for name in LAUNCHES:
        if name not in futures:
            futures[name] = pool.submit(plain, name)
    futures["eval_pp1"] = pool.submit(evaluate, 0)
    futures["eval_pp2"] = pool.submit(evaluate, 2, "--pipeline-parallel", 2, "--pipeline-layout", "1,2")
    futures["bad"] = pool.submit(bad)
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


def _scores(launches, name):
    output, proc = launches[name].result()
    _check(proc, f"launch {name}")
    return load_file(output / "scores.safetensors"), json.loads((output / "scores.json").read_text())


def _rel_err(a, b):
    scale = b.abs().max().item()
    assert scale > 0, "reference tensor is all zeros"
    return (a.double() - b.double()).abs().max().item() / scale


def _assert_scores_agree(got, ref, rtol, what):
    expected = {f"{m}{d}" for m in ("easyep", "easyep_no_token", "easyep_no_norm", "gate", "frequency")
                for d in ["", "@math", "@code"]}
    assert set(got) == set(ref) == expected
    for key in sorted(ref):
        if rtol == 0 or key.startswith("frequency"):
            assert torch.equal(got[key], ref[key]), f"{what}: {key} differs"
        else:
            err = _rel_err(got[key], ref[key])
            assert err <= rtol, f"{what}: {key} relative difference {err:.1e} > {rtol}"
    # not a degenerate agreement: both MoE layers saw every domain's tokens
    assert (ref["frequency@math"].sum(dim=1) > 0).all() and (ref["frequency@code"].sum(dim=1) > 0).all()


def test_pp2_scores_bitwise_equal_to_one_process(launches):
    ref, ref_info = _scores(launches, "pp1")
    got, info = _scores(launches, "pp2")
    _assert_scores_agree(got, ref, 0, "PP=2 vs PP=1")
    assert info["tokens"] == ref_info["tokens"]  # counted once, on the first stage
    assert info["layers"] == ref_info["layers"] == [1, 2]  # global HF layer ids
    assert info["layout"]["pipeline_parallel"] == 2 and info["layout"]["stage_layers"] == [2, 1]
    assert info["layout"]["data_parallel"] == 1 and ref_info["layout"]["pipeline_parallel"] == 1


def test_uneven_layout_with_micro_batches_matches_one_demo_per_step(launches):
    ref, ref_info = _scores(launches, "pp1")
    got, info = _scores(launches, "pp2_layout12_micro")
    _assert_scores_agree(got, ref, 1e-6, "PP=2 (1+2 layers), micro-batches vs PP=1, one demo each")
    assert info["tokens"] == ref_info["tokens"]
    assert info["layout"]["stage_layers"] == [1, 2]
    # demos really were packed: fewer forwards than demos
    assert info["batching"]["micro_batches"] < len(MATH) + len(CODE)
    assert ref_info["batching"]["micro_batches"] == len(MATH) + len(CODE)


def test_pp2_ep2_on_four_ranks_matches_ep1(launches):
    ref, ref_info = _scores(launches, "pp1")
    got, info = _scores(launches, "pp2_ep2")
    _assert_scores_agree(got, ref, 1e-5, "PP=2 x EP=2 (4 ranks) vs one process")
    assert info["tokens"] == ref_info["tokens"]
    assert info["layout"] | {"backend": None} == {
        "world_size": 4, "tensor_parallel": 1, "pipeline_parallel": 2, "expert_parallel": 2,
        "data_parallel": 2, "backend": None, "stage_layers": [2, 1]}


def test_cprune_features_under_pp2_ep2_with_micro_batches_match_one_process(launches, ckpt):
    """C-Prune's features made on 4 ranks (PP=2 x EP=2, demos packed into micro-batches) are the
    one-process features (one demo per forward) within 1e-6, and select the same experts."""
    import numpy as np

    from megatron_easyep.pruning import cprune

    _, info = _scores(launches, "pp2_ep2_micro_cprune")
    _scores(launches, "pp1_cprune")
    assert info["batching"]["micro_batches"] < len(MATH) + len(CODE)  # demos really were packed
    ref = load_file(launches["pp1_cprune"].result()[0] / "cprune_features.safetensors")
    got = load_file(launches["pp2_ep2_micro_cprune"].result()[0] / "cprune_features.safetensors")
    for key in ("features", "pooled_inputs"):
        assert got[key].shape == ref[key].shape, key
        scale = ref[key].abs().max().item()
        assert scale > 0 and (got[key] - ref[key]).abs().max().item() <= 1e-6 * max(scale, 1.0), key
    config = DeepseekV3Config.load(ckpt)
    layers = info["layers"]
    for keep in (2, 4, 6):
        chosen = [cprune.cprune_selection(config, np.asarray(f["features"]), range(len(MATH) + len(CODE)),
                                          keep, "collapse", None, layers).kept for f in (ref, got)]
        assert chosen[0] == chosen[1], keep


def test_killed_pp_run_resumes_to_identical_scores(launches):
    output, killed, inprogress, resumed = launches["resume"].result()
    assert killed.killed, f"the run ended (exit {killed.returncode}) before it could be killed:\n{killed.stderr[-3000:]}"
    assert killed.returncode != 0
    assert any(n.startswith("state_rank1") for n in inprogress), inprogress  # the last stage's too
    _check(resumed, "--resume under PP")
    assert "resuming at step" in resumed.stderr, "the --resume run started over"
    assert int(resumed.stderr.split("resuming at step", 1)[1].split("/")[0]) >= 1
    ref, ref_info = _scores(launches, "pp2")
    got = load_file(output / "scores.safetensors")
    _assert_scores_agree(got, ref, 0, "resumed PP=2 vs uninterrupted PP=2")
    assert json.loads((output / "scores.json").read_text())["tokens"] == ref_info["tokens"]


def _tensor_bytes(ckpt: Path) -> dict[str, int]:
    """name -> stored bytes, from the safetensors headers (independent of the package's reader)."""
    sizes = {}
    for shard in ckpt.glob("*.safetensors"):
        with open(shard, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        header.pop("__metadata__", None)
        sizes.update({n: e["data_offsets"][1] - e["data_offsets"][0] for n, e in header.items()})
    return sizes


def test_each_stage_reads_only_its_layers_and_logits_are_bitwise_equal(launches, ckpt):
    out, proc = launches["worker"].result()
    _check(proc, "pipeline_worker")
    ref = torch.load(out / "pp1.pt")["logits"]
    sizes = _tensor_bytes(ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    num_layers = config["num_hidden_layers"]
    for spec, counts in (("2-1", [2, 1]), ("1-2", [1, 2])):
        ranks = [torch.load(out / f"pp{spec}.rank{r}.pt") for r in range(2)]
        got = ranks[1]["logits"]
        assert ranks[0]["logits"] is None and len(got) == len(ref)
        for a, b in zip(got, ref):
            assert a.shape == b.shape and torch.equal(a, b), f"layout {spec}: PP=2 logits differ from PP=1"
        start = 0
        for stage, n in enumerate(counts):
            layers = range(start, start + n)
            start += n
            mine = {name for name in sizes
                    if name.startswith("model.layers.") and int(name.split(".")[2]) in layers}
            if stage == 0:
                mine.add("model.embed_tokens.weight")
            reads = ranks[stage]["reads"]
            assert sorted(reads["names"]) == sorted(mine), f"layout {spec}, stage {stage}"
            assert reads["bytes"] == sum(sizes[name] for name in mine)
            # converters/plan.py's per-stage weights are what the stage really reads
            assert plan.stage_weights(DeepseekV3Config.load(ckpt), "bf16", 1, counts)[stage] == reads["bytes"]
            # the logits build reads the final norm and lm_head on the last stage, nothing else more
            extra = {"model.norm.weight", "lm_head.weight"} if stage == 1 else set()
            assert sorted(ranks[stage]["logits_model_reads"]["names"]) == sorted(mine | extra)
        # scoring reads every decoder layer once over the stages and never lm_head / norm / MTP
        scored = [n for r in ranks for n in r["reads"]["names"]]
        assert len(scored) == len(set(scored))
        assert set(scored) == {n for n in sizes if n not in ("lm_head.weight", "model.norm.weight")
                               and not n.startswith(f"model.layers.{num_layers}.")}


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_pipeline_input_is_refused_before_weights_are_read(launches, case):
    returncode, stderr, output = launches["bad"].result()[case]
    words = _bad_cases()[case][1]
    assert returncode == 2, f"{case}: exit {returncode}\n{stderr[-3000:]}"
    error_lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert error_lines, f"{case}: no 'error:' line:\n{stderr[-3000:]}"
    for word in words:
        assert word in error_lines[-1], f"{case}: {word!r} not in {error_lines[-1]!r}"
    assert "Traceback" not in stderr
    assert not (output / "scores.safetensors").exists()


def test_evaluate_under_pp_gives_bitwise_equal_logits_and_nll(launches):
    (ref_dir, ref_proc), (got_dir, got_proc) = launches["eval_pp1"].result(), launches["eval_pp2"].result()
    _check(ref_proc, "evaluate PP=1")
    _check(got_proc, "evaluate PP=2")
    ref, got = load_file(ref_dir / "logits.safetensors"), load_file(got_dir / "logits.safetensors")
    assert sorted(got) == sorted(ref) and len(ref) == len(MATH) + len(CODE)
    for key in ref:
        assert torch.equal(got[key], ref[key]), f"{key}: PP=2 logits differ from PP=1"
    results = [json.loads((d / "eval.json").read_text())["results"] for d in (ref_dir, got_dir)]
    assert results[0] == results[1] and set(results[0]) == set(DOMAINS)
    assert all(r["tokens"] > 0 for r in results[0].values())
