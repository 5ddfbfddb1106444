"""Expert scoring: the formula by hand, `torchrun launch/score.py` against an independent scorer on
stock transformers (tests/hf_scorer.py), layout independence, resume, score-file content, bad input.

Every torchrun launch of this file is started ONCE per session by the `launches` fixture, on a
pool of two worker threads (the machine has two cores; a launch is mostly Python imports, so two
at a time keeps both busy), while the test process computes the transformers oracle. Tests wait
only for the launches they read.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from faults import run_then_kill, snapshot_for_every_rank
from hf_scorer import METRIC_NAMES, hf_expert_scores
from megatron_easyep.scoring import metrics
from megatron_easyep.checkpoint.reader import DeepseekV3Config

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
SCORE = str(REPO / "launch" / "score.py")
DOMAINS = ["math", "code"]  # first-seen order: math file first
PARITY_RTOL = 1e-4  # Megatron vs transformers, relative to the tensor's max |value|
LAYOUT_RTOL = 1e-5  # Megatron layout vs layout
LAUNCH_TIMEOUT = 420


# --------------------------------------------------------------------------------------------
# 1. the formula, by hand
# --------------------------------------------------------------------------------------------

def _hand_s(h, h_tilde):
    dot = sum(a * b for a, b in zip(h, h_tilde))
    cos = dot / (math.sqrt(sum(a * a for a in h)) * math.sqrt(sum(b * b for b in h_tilde)))
    return max(0.0, 1.0 - cos)


def test_metrics_match_hand_computed_values():
    # token 0: h = (3, 4), h~ = (4, 3): cos = 24/25 -> s = 0.04
    # token 1: h = (0.1, 0.2), h~ = 2h: cos is 1 mathematically, 1.0000001 in fp32 -> s clamps to 0
    h = torch.tensor([[3.0, 4.0], [0.1, 0.2]])
    h_tilde = torch.tensor([[4.0, 3.0], [0.2, 0.4]])
    raw_cos = F.cosine_similarity(h[1:], h_tilde[1:], dim=-1).item()
    assert raw_cos > 1.0, "precondition: this pair must round cos above 1 in fp32 (clamp case)"
    s = metrics.token_contribution(h, h_tilde)
    hand_s = [_hand_s([3.0, 4.0], [4.0, 3.0]), _hand_s([0.1, 0.2], [0.2, 0.4])]
    assert hand_s[0] == pytest.approx(0.04, abs=1e-12) and hand_s[1] == 0.0
    assert s.dtype == torch.float32
    assert s[0].item() == pytest.approx(0.04, rel=1e-5)
    assert s[1].item() == 0.0  # clamped, not -1.19e-7

    # (token, expert, g, ||e||) pairs; token 0 has a g = 0 pair (expert 1), token 1 has s = 0.
    pairs = [(0, 0, 0.6, 2.0), (0, 2, 1.4, 0.5), (0, 1, 0.0, 3.0),
             (1, 2, 0.7, 1.0), (1, 1, 2.0, 0.25)]
    hand = {m: [0.0, 0.0, 0.0] for m in METRIC_NAMES}
    for token, expert, g, norm in pairs:
        st = hand_s[token]
        hand["easyep"][expert] += g * norm * st
        hand["easyep_no_token"][expert] += g * norm
        hand["easyep_no_norm"][expert] += g * st
        hand["gate"][expert] += g
        hand["frequency"][expert] += 1
    # the same numbers written out, so a mistake in the loop above cannot hide one in the code
    expected = {
        "easyep": [0.6 * 2.0 * 0.04, 0.0, 1.4 * 0.5 * 0.04],
        "easyep_no_token": [1.2, 0.0 * 3.0 + 2.0 * 0.25, 0.7 + 0.7],
        "easyep_no_norm": [0.6 * 0.04, 0.0, 1.4 * 0.04],
        "gate": [0.6, 2.0, 2.1],
        "frequency": [1, 2, 2],
    }
    for m in METRIC_NAMES:
        assert hand[m] == pytest.approx(expected[m], abs=1e-12), m

    ids = torch.tensor([p[1] for p in pairs])
    gate = torch.tensor([p[2] for p in pairs])
    norm = torch.tensor([p[3] for p in pairs])
    contrib = s[torch.tensor([p[0] for p in pairs])]
    got = metrics.expert_scores(ids, gate, norm, contrib, num_experts=3)
    assert set(got) == set(metrics.METRICS) == set(METRIC_NAMES)
    for m in METRIC_NAMES:
        assert got[m].dtype == torch.float64 and got[m].shape == (3,)
        assert got[m].tolist() == pytest.approx(expected[m], rel=1e-6, abs=1e-9), m


# --------------------------------------------------------------------------------------------
# fixtures: checkpoints, demos, launches, oracle
# --------------------------------------------------------------------------------------------

MATH = [
    ("What is 3 + 2?", "3 + 2 = 5, 3 * 2 = 6. The answer is 5."),
    ("Let x = 7. What is x^2?", "Let x = 7. Then x^2 = 49 and sqrt(49) = 7. So x^2 = 49."),
    ("Compute 17 * 11 step by step.",
     "17 * 11 = 17 * 10 + 17 = 170 + 17 = 187. The model reads a prompt, thinks step by step, "
     "and writes the answer at the end: 187."),
    ("Is 24 + 38 = 62?", "Yes, 24 + 38 = 62."),
    ("Please summarise: a mixture of experts routes every token to a few experts.",
     "Each token goes to a few experts chosen by a learned router; the shared expert sees every "
     "token. Let x = 3. Then x^2 = 9."),
]
CODE = [
    [{"role": "user", "content": "Write the forward of an MLP."},
     {"role": "assistant", "content": "def forward(self, hidden_states):\n    return self.down_proj("
                                      "self.act(self.gate_proj(hidden_states)))\n"}],
    [{"role": "user", "content": "Print the even numbers below 10."},
     {"role": "assistant", "content": "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n"}],
    [{"role": "system", "content": "You are a careful programmer."},
     {"role": "user", "content": "Load a JSON config."},
     {"role": "assistant", "content": 'with open("config.json") as f:\n    config = json.load(f)\n'},
     {"role": "user", "content": "And print the hidden size?"},
     {"role": "assistant", "content": 'print(config["hidden_size"])'}],
    [{"role": "user", "content": "Dot product in C."},
     {"role": "assistant", "content": "int main(void) { for (int i = 0; i < n; ++i) { sum += a[i] * "
                                      "b[i]; } return 0; }"}],
]


@pytest.fixture(scope="session")
def demo_files(tmp_path_factory):
    """math.jsonl (prompt/response, domain from FILE:DOMAIN) and code.jsonl (messages, domain from
    each line's "domain" field). 9 demos: odd, so at DP=2 one rank runs a step without a demo."""
    root = tmp_path_factory.mktemp("demos")
    math_file, code_file = root / "math.jsonl", root / "code.jsonl"
    math_file.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in MATH))
    code_file.write_text("".join(json.dumps({"messages": m, "domain": "code"}) + "\n" for m in CODE))
    return [f"{math_file}:math", str(code_file)]


def _oracle_demos(ckpt):
    """(input_ids, domain) for every demo, tokenised with transformers' own tokenizer and chat
    template (independent of megatron_easyep.scoring.demos)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    out = []
    for messages, domain in ([([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                               "math") for p, r in MATH] + [(m, "code") for m in CODE]):
        ids = tokenizer.apply_chat_template(messages, tokenize=True)
        ids = list(ids["input_ids"] if not isinstance(ids, list) else ids)
        out.append((ids, domain))
    return out


@pytest.fixture(scope="session")
def checkpoints(tiny_checkpoint_factory):
    return {
        "tiny": tiny_checkpoint_factory(),
        # one routing group: plain top-k (Megatron gets no group options at all)
        "ngroup1": tiny_checkpoint_factory(n_group=1, topk_group=1),
        # no Q LoRA (plain q_proj) and block-wise FP8 with blocks smaller than the matrices
        "fp8_noqlora": tiny_checkpoint_factory(fp8=True, q_lora_rank=None, weight_block_size=[32, 32]),
    }


def _env(**extra):
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **extra)
    return env


def _score_cmd(nproc, ckpt, demos, output, *args):
    launcher = [TORCHRUN, "--standalone", f"--nproc-per-node={nproc}"] if nproc else [PYTHON]
    cmd = launcher + [SCORE, "--hf-checkpoint", str(ckpt), "--output", str(output)]
    for spec in demos:
        cmd += ["--demos", spec]
    return cmd + [str(a) for a in args]


def _run(cmd, **env):
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=_env(**env),
                          timeout=LAUNCH_TIMEOUT)


class Launch:
    def __init__(self, output: Path, ckpt: Path, nproc: int, ep: int, dispatcher: str):
        self.output, self.ckpt, self.nproc, self.ep, self.dispatcher = output, ckpt, nproc, ep, dispatcher
        self.proc = None

    def scores(self) -> dict[str, torch.Tensor]:
        return load_file(self.output / "scores.safetensors")

    def info(self) -> dict:
        return json.loads((self.output / "scores.json").read_text())


def _check(proc, what):
    assert proc.returncode == 0, (f"{what} failed (exit {proc.returncode}):\n"
                                  f"{proc.stderr[-4000:]}\n{proc.stdout[-2000:]}")


# name: (checkpoint, nproc, expert_parallel, dispatcher)
LAUNCHES = {
    "ep1": ("tiny", 1, 1, "alltoall"),
    "ep2_alltoall": ("tiny", 2, 2, "alltoall"),
    "ep2_allgather": ("tiny", 2, 2, "allgather"),
    "dp2_ep1": ("tiny", 2, 1, "alltoall"),
    "ngroup1_ep2": ("ngroup1", 2, 2, "allgather"),
    "fp8_noqlora_ep1": ("fp8_noqlora", 1, 1, "alltoall"),
}
RESUME_LAYOUT = "ep2_alltoall"  # the interrupted + resumed run uses this launch's layout


@pytest.fixture(scope="session")
def launches(checkpoints, demo_files, tmp_path_factory):
    """Start every launch of this file (two at a time); {name: Future[Launch]}. The resume pair
    (killed run, then --resume) is one job, "resume"."""
    root = tmp_path_factory.mktemp("scores")
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)

    def plain(name):
        ckpt_key, nproc, ep, dispatcher = LAUNCHES[name]
        launch = Launch(root / name, checkpoints[ckpt_key], nproc, ep, dispatcher)
        launch.proc = _run(_score_cmd(nproc, launch.ckpt, demo_files, launch.output,
                                      "--expert-parallel", ep, "--dispatcher", dispatcher))
        return launch

    def resume():
        ckpt_key, nproc, ep, dispatcher = LAUNCHES[RESUME_LAYOUT]
        launch = Launch(root / "resumed", checkpoints[ckpt_key], nproc, ep, dispatcher)
        cmd = _score_cmd(nproc, launch.ckpt, demo_files, launch.output, "--expert-parallel", ep,
                         "--dispatcher", dispatcher, "--checkpoint-every", 1)
        inprogress = launch.output.with_name(launch.output.name + ".inprogress")
        # SIGKILL the whole torchrun tree once every rank has a snapshot (as a lost node would)
        killed = run_then_kill(cmd, ready=snapshot_for_every_rank(inprogress, nproc), env=_env(), cwd=REPO,
                               timeout=LAUNCH_TIMEOUT)
        after_kill = {"output_exists": launch.output.exists(),
                      "inprogress": sorted(p.name for p in inprogress.glob("*"))}
        launch.killed, launch.after_kill = killed, after_kill
        launch.proc = _run(cmd + ["--resume"])
        return launch

    futures = {"resume": pool.submit(resume)}  # longest chain first
    for name in LAUNCHES:
        futures[name] = pool.submit(plain, name)
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


def _done(launches, name) -> Launch:
    launch = launches[name].result()
    _check(launch.proc, f"launch {name}")
    return launch


@pytest.fixture(scope="session")
def oracle(launches, checkpoints):
    """{checkpoint key: (scores, layers, tokens)} from tests/hf_scorer.py, computed lazily while
    the launches run."""
    cache = {}

    def get(key):
        if key not in cache:
            cache[key] = hf_expert_scores(checkpoints[key], _oracle_demos(checkpoints[key]))
        return cache[key]

    return get


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().item()
    assert scale > 0, "reference tensor is all zeros"
    return (a.double() - b.double()).abs().max().item() / scale


def _expected_names():
    return {m for m in METRIC_NAMES} | {f"{m}@{d}" for m in METRIC_NAMES for d in DOMAINS}


def _layout_case(drop_row: bool):
    """One MoE layer's observation on one rank (EP 1): 6 tokens, 4 experts, top-2; the rows laid
    out as the dispatcher does (grouped by expert, tokens in order), one row missing if asked."""
    from megatron_easyep.mcore.compat import MoEObservation

    gen = torch.Generator().manual_seed(0)
    tokens, experts, hidden = 6, 4, 8
    top = torch.randn(tokens, experts, generator=gen).topk(2, dim=-1).indices
    routing = torch.zeros(tokens, experts, dtype=torch.bool).scatter_(1, top, True)
    probs = torch.where(routing, torch.rand(tokens, experts, generator=gen) + 0.1, torch.zeros(()))
    local, token = routing.T.nonzero().unbind(1)
    rows = torch.randn(local.shape[0], hidden, generator=gen)
    row_probs = probs[token, local]
    if drop_row:
        rows, row_probs = rows[1:], row_probs[1:]
    return MoEObservation(
        residual=torch.randn(tokens, hidden, generator=gen), moe_input=torch.randn(tokens, hidden, generator=gen),
        routed_output=torch.randn(tokens, hidden, generator=gen), routing_map=routing, probs=probs,
        expert_rows=rows, row_probs=row_probs, tokens_per_local_expert=routing.sum(0),
        local_expert_ids=list(range(experts)))


@pytest.mark.parametrize("deferred", [False, True])
def test_row_layout_check_runs_on_every_device(deferred):
    """The dispatcher row-layout check: at once on CPU; deferred (no host sync per forward, as on
    GPU) it raises before any result leaves the scorer, naming the layer."""
    from megatron_easyep.scoring.scorer import ExpertScorer

    scorer = ExpertScorer([3], 4, ["all"])
    scorer.defer_layout_check = deferred
    scorer.begin_step(torch.zeros(6, dtype=torch.long))
    scorer.observe(3, _layout_case(drop_row=False))
    scorer.all_reduce()  # a consistent layout passes
    if not deferred:
        with pytest.raises(RuntimeError, match="layer 3: 11 expert rows but the routing map routes 12"):
            scorer.observe(3, _layout_case(drop_row=True))
        return
    scorer.observe(3, _layout_case(drop_row=True))
    with pytest.raises(RuntimeError, match="layer 3: in 1 forward.*row layout is not what"):
        scorer.state_dict()
    with pytest.raises(RuntimeError, match="layer 3: in 1 forward"):
        scorer.all_reduce()


# --------------------------------------------------------------------------------------------
# 2. Megatron scores == transformers scores
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(LAUNCHES))
def test_scores_match_transformers(launches, oracle, name):
    ref, layers, tokens = oracle(LAUNCHES[name][0])
    launch = _done(launches, name)
    got = launch.scores()
    assert set(got) == _expected_names() == set(ref)
    config = DeepseekV3Config.load(launch.ckpt)
    k = config.num_experts_per_tok
    errors = {}
    for key in sorted(ref):
        assert got[key].shape == (len(layers), config.n_routed_experts), key
        assert got[key].dtype in (torch.float32, torch.float64), key
        errors[key] = _rel_err(got[key], ref[key])
    print(f"\n{name}: max relative error vs transformers per tensor: "
          + ", ".join(f"{k_}={v:.1e}" for k_, v in errors.items()))
    bad = {key: err for key, err in errors.items() if not err <= PARITY_RTOL}
    assert not bad, f"{name}: tensors disagree with transformers beyond {PARITY_RTOL}: {bad}"
    # not a degenerate agreement: every token of every layer was routed to k experts, the
    # token contribution is non-trivial, and both domains contributed
    for d in DOMAINS:
        assert got[f"frequency@{d}"].sum(dim=1).tolist() == [tokens[d] * k] * len(layers)
        assert (got[f"easyep@{d}"] > 0).sum() >= len(layers) * 4
    assert torch.equal(got["frequency"], ref["frequency"].to(got["frequency"].dtype))


# --------------------------------------------------------------------------------------------
# 3. layouts agree
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,reference", [
    ("ep2_alltoall", "ep1"),           # EP=1 vs EP=2
    ("ep2_allgather", "ep2_alltoall"),  # allgather vs alltoall
    ("dp2_ep1", "ep1"),                # data parallel (2 replicas, EP=1) vs one rank
])
def test_layouts_agree(launches, name, reference):
    got, ref = _done(launches, name).scores(), _done(launches, reference).scores()
    assert set(got) == set(ref) == _expected_names()
    errors = {key: _rel_err(got[key], ref[key]) for key in sorted(ref)}
    print(f"\n{name} vs {reference}: max relative difference: "
          + ", ".join(f"{k}={v:.1e}" for k, v in errors.items()))
    bad = {key: err for key, err in errors.items() if not err <= LAYOUT_RTOL}
    assert not bad, f"{name} vs {reference} beyond {LAYOUT_RTOL}: {bad}"
    for key in ["frequency"] + [f"frequency@{d}" for d in DOMAINS]:  # counts are exact
        assert torch.equal(got[key], ref[key]), key
    info = _done(launches, name).info()
    ckpt_key, nproc, ep, dispatcher = LAUNCHES[name]
    assert info["layout"]["world_size"] == nproc and info["layout"]["expert_parallel"] == ep
    assert info["layout"]["data_parallel"] == nproc  # TP = PP = 1
    assert info["dispatcher"] == dispatcher


# --------------------------------------------------------------------------------------------
# 4. resume
# --------------------------------------------------------------------------------------------

def test_killed_run_resumes_to_identical_scores(launches):
    resumed = launches["resume"].result()
    killed = resumed.killed
    assert killed.killed, f"the run ended (exit {killed.returncode}) before it could be killed:\n{killed.stderr[-3000:]}"
    assert killed.returncode != 0
    assert not resumed.after_kill["output_exists"], "a killed run must not leave OUTPUT"
    assert any(n.startswith("state_rank") for n in resumed.after_kill["inprogress"]), \
        f"no resumable snapshot in OUTPUT.inprogress: {resumed.after_kill['inprogress']}"
    _check(resumed.proc, "--resume run")
    assert "resuming at step" in resumed.proc.stderr, "the --resume run started over"
    step = int(resumed.proc.stderr.split("resuming at step", 1)[1].split("/")[0])
    assert step >= 1
    assert not resumed.output.with_name(resumed.output.name + ".inprogress").exists()

    uninterrupted = _done(launches, RESUME_LAYOUT)
    got, ref = resumed.scores(), uninterrupted.scores()
    assert set(got) == set(ref) == _expected_names()
    for key in sorted(ref):
        assert torch.equal(got[key], ref[key]), f"{key}: resumed scores differ from an uninterrupted run"
    assert resumed.info()["tokens"] == uninterrupted.info()["tokens"]


# --------------------------------------------------------------------------------------------
# 5. scores.json
# --------------------------------------------------------------------------------------------

def test_scores_json_content(launches, oracle, checkpoints, demo_files):
    launch = _done(launches, "ep1")
    info = launch.info()
    ckpt = checkpoints["tiny"]
    config = json.loads((ckpt / "config.json").read_text())
    moe_layers = [i for i in range(config["num_hidden_layers"])
                  if i >= config["first_k_dense_replace"] and i % config["moe_layer_freq"] == 0]
    assert info["layers"] == moe_layers == [1, 2]
    assert info["metrics"] == list(METRIC_NAMES)
    assert info["domains"] == DOMAINS
    assert info["num_experts"] == config["n_routed_experts"]

    # token counts from transformers' own tokenizer + chat template
    _, oracle_layers, _ = oracle("tiny")
    assert oracle_layers == moe_layers
    counts = {d: 0 for d in DOMAINS}
    for ids, domain in _oracle_demos(ckpt):
        counts[domain] += len(ids)
    assert info["tokens"] == {"all": sum(counts.values()), **counts}
    assert info["demos_per_domain"] == {"math": len(MATH), "code": len(CODE)}

    assert info["config_hash"] == DeepseekV3Config.load(ckpt).config_hash
    files = [spec.rsplit(":", 1)[0] if spec.endswith(":math") else spec for spec in demo_files]
    assert [d["sha256"] for d in info["demos"]] == [
        hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in files]
    assert [d["domain"] for d in info["demos"]] == ["math", None]
    assert info["layout"]["world_size"] == 1 and info["layout"]["expert_parallel"] == 1
    assert info["megatron_core_version"].startswith("0.19")

    from safetensors import safe_open

    with safe_open(launch.output / "scores.safetensors", framework="pt") as f:
        assert f.metadata()["config_hash"] == info["config_hash"]


# --------------------------------------------------------------------------------------------
# 6. bad input: clear error, non-zero exit, no score file
# --------------------------------------------------------------------------------------------

def _bad_cases(root: Path, good: str):
    """name -> (demo specs, extra args, pre-existing output?, words stderr must contain)."""
    empty = root / "empty.jsonl"
    empty.write_text("")
    malformed = root / "malformed.jsonl"
    malformed.write_text(json.dumps({"input_ids": [5, 6, 7]}) + "\n\n"
                         + '{"prompt": "hi", "response": \n')
    big = root / "big_id.jsonl"
    big.write_text(json.dumps({"input_ids": [5, 6, 7]}) + "\n" + json.dumps({"input_ids": [4, 512, 9]}) + "\n")
    blank = root / "blank.jsonl"
    blank.write_text("\n   \n\n")
    return {
        "empty_jsonl": ([str(empty)], [], False, [str(empty), "no demonstrations"]),
        "malformed_json": ([str(malformed)], [], False, [f"{malformed}:3", "malformed JSON"]),
        "token_id_out_of_vocab": ([str(big)], [], False, [f"{big}:2", "token id 512", "vocab"]),
        "domain_without_demos": ([good, f"{blank}:physics"], [], False, [str(blank), "no demonstrations"]),
        "output_exists": ([good], [], True, ["exists", "--overwrite"]),
        # 0 must reach the validation, not fall back to the YAML default
        "zero_max_demos": ([good], ["--max-demos", "0"], False, ["max-demos", "positive"]),
    }


@pytest.fixture(scope="module")
def bad_runs(checkpoints, demo_files, tmp_path_factory):
    """Every bad-input case, run concurrently as plain single-process `python launch/score.py`."""
    root = tmp_path_factory.mktemp("bad")
    cases = _bad_cases(root, demo_files[0])
    procs = {}
    for name, (specs, args, existing, _) in cases.items():
        output = root / f"out_{name}"
        if existing:
            output.mkdir()
            (output / "keep.txt").write_text("precious")
        cmd = _score_cmd(0, checkpoints["tiny"], specs, output, *args)
        procs[name] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        cwd=REPO, env=_env()), output)
    results = {}
    for name, (proc, output) in procs.items():
        out, err = proc.communicate(timeout=LAUNCH_TIMEOUT)
        results[name] = (proc.returncode, err, output)
    return cases, results


@pytest.mark.parametrize("case", ["empty_jsonl", "malformed_json", "token_id_out_of_vocab",
                                  "domain_without_demos", "output_exists", "zero_max_demos"])
def test_bad_input_is_refused(bad_runs, case):
    cases, results = bad_runs
    returncode, stderr, output = results[case]
    assert returncode != 0, f"{case}: exit 0\n{stderr[-3000:]}"
    error_lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert error_lines, f"{case}: no 'error:' line in stderr:\n{stderr[-3000:]}"
    for word in cases[case][3]:
        assert word in error_lines[-1], f"{case}: {word!r} not in {error_lines[-1]!r}"
    assert "Traceback" not in stderr, f"{case}: a traceback instead of a clear error"
    assert not (output / "scores.safetensors").exists()
    assert not output.with_name(output.name + ".inprogress").exists()
    if cases[case][2]:  # the pre-existing output is left alone
        assert sorted(p.name for p in output.iterdir()) == ["keep.txt"]
        assert (output / "keep.txt").read_text() == "precious"
    else:
        assert not output.exists()
