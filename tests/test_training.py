"""The offline corpus, training with Megatron-Core on it, and the Megatron -> HF converter.

* corpus: three domains, a whole-document split that depends only on the seed, no held-out text
  (down to prose paragraphs) in training, a deterministic tokenizer with DeepSeek's specials,
  arithmetic in the math domain that is actually right.
* training: the documented run (ci preset: a few hundred KB of real text per domain, 30 steps)
  lowers held-out loss in every domain, updates the expert bias the aux-loss-free way, and writes
  BF16 / FP8 checkpoints that stock transformers loads with the same held-out loss; one step is
  bit-reproducible from the seed.
* converter: a randomly initialised Megatron GPTModel written by hf_writer loads in stock
  transformers with no missing/unexpected keys and gives the Megatron logits to 1e-4 (fp32 storage;
  bf16 storage against Megatron with bf16-rounded weights), reads back into Megatron bit-exactly,
  and its FP8 variant stays close to the BF16 one.

Megatron runs in this process (gloo, world size 1, one torch thread, Megatron's torch.compile'd
helpers eager -- see training.eager_megatron).
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from hf_oracle import dequantized_state_dict, load_transformers_model, read_checkpoint_tensors
from megatron_easyep.training import corpus as C
from megatron_easyep.checkpoint.tiny import DEEPSEEK_V3_CONFIG, SPECIAL_TOKENS

REPO = Path(__file__).resolve().parent.parent
CI_CORPUS = dict(max_bytes_per_domain=150_000, math_document_count=300)
REL_TOL = 1e-4


# --------------------------------------------------------------------------------------------
# corpus and tokenizer
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_corpus():
    return C.build_corpus(0, **CI_CORPUS)


def _paragraphs(doc):
    return {" ".join(p.split()) for p in re.split(r"\n\s*\n", doc.text) if p.strip()}


def test_corpus_split_is_by_document_and_seeded(small_corpus):
    corpus = small_corpus
    assert corpus.domains == ("code", "prose", "math")
    for domain in corpus.domains:
        train, heldout = corpus.train[domain], corpus.heldout[domain]
        assert train and heldout, domain
        train_ids, heldout_ids = {d.doc_id for d in train}, {d.doc_id for d in heldout}
        assert not train_ids & heldout_ids
        assert not {d.text for d in train} & {d.text for d in heldout}
        assert all(d.domain == domain for d in train + heldout)
        assert sum(d.nbytes for d in train + heldout) <= CI_CORPUS["max_bytes_per_domain"]
    # prose is de-duplicated by paragraph: no held-out paragraph was trained on
    train_paragraphs = set().union(*(_paragraphs(d) for d in corpus.train["prose"]))
    for doc in corpus.heldout["prose"]:
        assert not _paragraphs(doc) & train_paragraphs, doc.doc_id
    # code is the standard library without tests / site-packages / pydoc_data
    for doc in corpus.train["code"] + corpus.heldout["code"]:
        path = doc.doc_id.removeprefix("code:")
        assert path.endswith(".py")
        assert not re.search(r"(^|/)(test|tests|site-packages|pydoc_data|encodings)/", path), path
    # same seed -> same split and text; another seed -> another split
    again = C.build_corpus(0, **CI_CORPUS)
    assert again.manifest() == corpus.manifest()
    other = C.build_corpus(1, **CI_CORPUS)
    assert {d.doc_id for d in other.heldout["code"]} != {d.doc_id for d in corpus.heldout["code"]}


def test_math_domain_is_correct_arithmetic(small_corpus):
    checked = 0
    for doc in small_corpus.train["math"][:100]:
        for a, op, b, c in re.findall(r"^\d+\. (-?\d+) ([-+*]) (-?\d+) = (-?\d+)$", doc.text, re.M):
            assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(c)
            checked += 1
        for x, y, rhs in re.findall(r"\(x ([-+] \d+)\)\(x ([-+] \d+)\) = (.+)$", doc.text, re.M):
            a, b = int(x.replace(" ", "")), int(y.replace(" ", ""))
            expr = re.sub(r"(\d)x", r"\1*x", rhs.replace("^", "**"))
            assert re.fullmatch(r"[-+*x\d ]+", expr), rhs
            for value in (2, 3, -5):
                assert eval(expr, {"x": value}) == (value + a) * (value + b), rhs
            checked += 1
        for a, b, c, x in re.findall(r"Solve (\d+)x ([-+] \d+) = (-?\d+)\. .*Divide by \d+: x = (-?\d+)\.", doc.text):
            assert int(a) * int(x) + int(b.replace(" ", "")) == int(c)
            checked += 1
        for a, b, g in re.findall(r"so gcd\((\d+), (\d+)\) = (\d+)\.", doc.text):
            assert math.gcd(int(a), int(b)) == int(g)
            checked += 1
    assert checked > 200


def test_tokenizer_deterministic_with_deepseek_specials(small_corpus, tmp_path):
    tokenizer = C.train_tokenizer(small_corpus, 1024)
    assert tokenizer.to_str() == C.train_tokenizer(small_corpus, 1024).to_str()
    assert tokenizer.get_vocab_size() == 1024
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    for domain in small_corpus.domains:
        text = small_corpus.heldout[domain][0].text[:2000]
        ids = tokenizer.encode(text).ids
        assert ids[0] == 0 and 0 not in ids[1:]  # bos prepended like DeepSeek's tokenizer
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    paths = C.write_demo_files(tmp_path, tokenizer, small_corpus, length=64, heldout_per_domain=10,
                               calib_per_domain=5)
    heldout_ids = {d: {doc.doc_id for doc in small_corpus.heldout[d]} for d in small_corpus.domains}
    for name, path in paths.items():
        domain, split = name.split("_")
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert rows and all(r["domain"] == domain for r in rows)
        assert all(16 <= len(r["input_ids"]) <= 64 and max(r["input_ids"]) < 1024 for r in rows)
        assert all((r["doc"] in heldout_ids[domain]) == (split == "heldout") for r in rows)
        assert rows[0]["input_ids"][0] == 0  # a document's first window starts with bos


# --------------------------------------------------------------------------------------------
# Megatron in this process
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def megatron():
    from megatron_easyep.mcore import parallel as distributed
    from megatron_easyep.training import train as training

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    distributed.init_parallel(1, seed=0)
    with training.eager_megatron():
        yield
    torch.set_num_threads(threads)
    distributed.shutdown()


@pytest.fixture(scope="module")
def trained_run(megatron, tmp_path_factory):
    from megatron_easyep.training.train import TrainConfig, run_training

    out = tmp_path_factory.mktemp("train") / "run"
    report = run_training(TrainConfig(output=out, preset="ci", seed=0, fp8=True,
                                      fp8_block_size=(32, 32), quiet=True))
    return out, report


def test_training_lowers_heldout_loss_and_balances(trained_run):
    out, report = trained_run
    init, final = report["heldout"]["init"], report["heldout"]["final"]
    for domain in ("code", "prose", "math"):
        assert init[domain]["loss"] == pytest.approx(math.log(1024), abs=0.1)  # random init
        assert final[domain]["loss"] < init[domain]["loss"] - 0.5, (domain, init, final)
        assert final[domain]["tokens"] > 500
    assert report["steps"] == 30 and len(report["curve"]) == 30
    assert report["curve"][-1]["train_loss"] < report["curve"][0]["train_loss"] - 0.5

    # aux-loss-free balancing: every step moves each bias by exactly +-rate or 0, then the
    # final per-layer shift makes the smallest bias 0
    state = torch.load(out / "megatron" / "model_state.pt", weights_only=True)
    rate = report["train_config"]["bias_update_rate"]
    biases = {k: v for k, v in state.items() if k.endswith("router.expert_bias")}
    assert len(biases) == 2
    for name, bias in biases.items():
        assert bias.dtype == torch.float32
        assert float(bias.min()) == 0.0 and float(bias.max()) > 0
        steps = (bias - bias.min()) / rate
        assert torch.allclose(steps, steps.round(), atol=1e-3) and float(steps.max()) <= 60

    for layer, entry in report["routing"]["final"].items():
        for domain, share in entry["token_share"].items():
            assert len(share) == 16 and sum(share) == pytest.approx(4.0, abs=1e-3)
            assert 0 < entry["usage_entropy_bits"][domain] <= 4.0
        assert all(0 <= v <= 1 for v in entry["js_divergence_bits"].values())


def test_trained_checkpoints_load_in_transformers(trained_run):
    out, report = trained_run
    checks = report["checkpoint_checks"]
    trained = checks["trained_model"]
    for domain, r in checks["megatron_bf16_checkpoint"].items():
        assert r["loss"] == pytest.approx(trained[domain]["loss"], abs=0.02)
    for domain, r in checks["megatron_fp8_checkpoint"].items():
        assert r["loss"] == pytest.approx(trained[domain]["loss"], abs=0.1)
    for domain, r in checks["transformers_bf16_checkpoint"].items():
        assert r["loss"] == pytest.approx(checks["megatron_bf16_checkpoint"][domain]["loss"], rel=1e-4)
    demo = json.loads((out / "demos" / "code_heldout.jsonl").read_text().splitlines()[0])["input_ids"]
    logits = {}
    for variant in ("hf", "hf-fp8"):
        model = load_transformers_model(out / variant)  # asserts no missing / unexpected keys
        assert model.config.n_routed_experts == 16
        with torch.no_grad():
            logits[variant] = model(torch.tensor([demo])).logits[0]
    # the trained model's FP8 variant predicts like its BF16 one
    b, f = logits["hf"], logits["hf-fp8"]
    assert 0 < ((f - b).norm() / b.norm()).item() < 0.05
    assert (f.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.9
    config = json.loads((out / "hf" / "config.json").read_text())
    assert set(DEEPSEEK_V3_CONFIG) <= set(config) and config["torch_dtype"] == "bfloat16"
    fp8_config = json.loads((out / "hf-fp8" / "config.json").read_text())
    assert fp8_config["quantization_config"]["weight_block_size"] == [32, 32]
    for split in ("heldout", "calib"):
        for domain in ("code", "prose", "math"):
            assert (out / "demos" / f"{domain}_{split}.jsonl").is_file()


def test_converter_cli_reproduces_the_training_checkpoint(trained_run, tmp_path):
    out, _ = trained_run
    sys.path.insert(0, str(REPO / "converters"))
    try:
        import megatron_to_hf
    finally:
        sys.path.remove(str(REPO / "converters"))
    dst = tmp_path / "converted"
    assert megatron_to_hf.main(["--megatron", str(out / "megatron"), "--output", str(dst)]) == 0
    ours, theirs = read_checkpoint_tensors(dst), read_checkpoint_tensors(out / "hf")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert (dst / "tokenizer.json").read_text() == (out / "hf" / "tokenizer.json").read_text()
    # an existing output is refused (exit 2), nothing is overwritten
    assert megatron_to_hf.main(["--megatron", str(out / "megatron"), "--output", str(dst)]) == 2


def test_training_step_is_reproducible_from_the_seed(megatron, small_corpus):
    from megatron_easyep.training import train as training
    from megatron_easyep.checkpoint.reader import DeepseekV3Config

    tokenizer = C.train_tokenizer(small_corpus, 1024)
    streams = {d: C.token_stream(C.encode_documents(tokenizer, small_corpus.train[d][:5]))
               for d in small_corpus.domains}
    cfg = DeepseekV3Config.from_dict(training.model_config("ci"))

    def run(seed):
        model = training.build_training_model(cfg, seed=seed, seq_aux_loss_coeff=1e-4)
        init = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        opt = training.make_optimizer(model, lr=3e-3, weight_decay=0.1)
        sampler = training.BatchSampler(streams, 6, 32, seed=seed)
        pos = torch.arange(32).unsqueeze(0).expand(6, -1)
        for _ in range(3):
            training.train_step(model, opt, *sampler.next(), pos, clip_grad=1.0, bias_update_rate=1e-3)
        return init, {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}

    init_a, a = run(7)
    init_b, b = run(7)
    init_c, _ = run(8)
    assert all(torch.equal(init_a[k], init_b[k]) for k in init_a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], init_a[k]) for k in a)  # it trained
    assert not torch.equal(init_a["embedding.word_embeddings.weight"], init_c["embedding.word_embeddings.weight"])


# --------------------------------------------------------------------------------------------
# converter: logits parity with stock transformers
# --------------------------------------------------------------------------------------------

DEMOS = [[0, 17, 92, 45, 201, 7, 66, 311, 12, 5, 480, 33, 9, 2, 250],
         list(range(100, 140)), [0, 9, 8, 7]]


@torch.no_grad()
def _randomise(model, seed):
    """Distinct, decisive random weights: norms around 1, a wide router (no near-ties between
    implementations), positive expert bias (see training.shift_expert_bias_nonnegative)."""
    from megatron_easyep.mcore.mapping import IGNORED_SUFFIXES

    g = torch.Generator().manual_seed(seed)
    for name, t in model.state_dict(keep_vars=True).items():
        if not isinstance(t, torch.Tensor) or name.endswith(IGNORED_SUFFIXES):
            continue
        if name.endswith("expert_bias"):
            t.copy_(0.05 * torch.rand(t.shape, generator=g))
        elif t.dim() == 1:
            t.copy_(1 + 0.1 * torch.randn(t.shape, generator=g))
        else:
            std = (2.0 if name.endswith("router.weight") else 1.0) / math.sqrt(t.shape[1])
            t.copy_(std * torch.randn(t.shape, generator=g))


@pytest.fixture(scope="module")
def random_model(megatron):
    from megatron_easyep.training import train as training
    from megatron_easyep.checkpoint.reader import DeepseekV3Config

    config = training.model_config("ci", vocab_size=512)
    cfg = DeepseekV3Config.from_dict(config)
    model = training.build_training_model(cfg, seed=5).eval()
    _randomise(model, 5)
    return config, model


def _megatron_logits(model):
    from megatron_easyep.mcore.model import forward_padded

    with torch.no_grad():
        return [forward_padded(model, ids, 48)[:len(ids)].float() for ids in DEMOS]


def _hf_logits(ckpt_dir):
    model = load_transformers_model(ckpt_dir, torch.float32)
    with torch.no_grad():
        return [model(torch.tensor([ids])).logits[0] for ids in DEMOS]


def _assert_close(got, want, what):
    for i, (g, w) in enumerate(zip(got, want)):
        scale = w.abs().max().item()
        err = (g - w).abs().max().item()
        assert err <= REL_TOL * scale, f"{what} demo {i}: |diff| {err:.3g}, scale {scale:.3g}"


def test_megatron_to_hf_fp32_logits_and_round_trip(random_model, tmp_path):
    from megatron_easyep.mcore.to_hf import write_hf_checkpoint
    from megatron_easyep.mcore.model import load_megatron_model

    config, model = random_model
    dst = write_hf_checkpoint(model, config, tmp_path / "fp32", dtype="float32", num_shards=3)
    assert (dst / "model.safetensors.index.json").is_file()
    _assert_close(_hf_logits(dst), _megatron_logits(model), "fp32 transformers vs Megatron")
    # Megatron -> HF -> Megatron through the project's loader is the identity
    _, back = load_megatron_model(dst, dtype=torch.float32)
    original = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    reloaded = back.state_dict()
    for name, value in original.items():
        assert torch.equal(reloaded[name], value), name


def test_megatron_to_hf_bf16_and_fp8(random_model, tmp_path):
    from megatron_easyep.mcore.to_hf import write_hf_checkpoint
    from megatron_easyep.mcore.model import build_model, transformer_config
    from megatron_easyep.checkpoint.reader import DeepseekV3Config

    config, model = random_model
    bf16 = write_hf_checkpoint(model, config, tmp_path / "bf16", num_shards=1)
    fp8 = write_hf_checkpoint(model, config, tmp_path / "fp8", fp8=True, weight_block_size=(32, 32))

    # bf16 storage: equal to Megatron with its weights rounded to bf16 (expert bias stays fp32)
    cfg = DeepseekV3Config.from_dict(config)
    rounded = build_model(cfg, transformer_config(cfg))
    state = {k: (v if k.endswith("expert_bias") else v.to(torch.bfloat16).float())
             for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    rounded.load_state_dict(state, strict=False)
    bf16_logits = _hf_logits(bf16)
    _assert_close(bf16_logits, _megatron_logits(rounded), "bf16 transformers vs rounded Megatron")

    with safe_open(bf16 / "model.safetensors", framework="pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert {d for k, d in dtypes.items() if not k.endswith("e_score_correction_bias")} == {"BF16"}
    assert {d for k, d in dtypes.items() if k.endswith("e_score_correction_bias")} == {"F32"}

    stored = read_checkpoint_tensors(fp8)
    for name, tensor in stored.items():
        if name.endswith("_scale_inv"):
            weight = stored[name.removesuffix("_scale_inv")]
            assert weight.dtype == torch.float8_e4m3fn
            assert tuple(tensor.shape) == tuple(math.ceil(s / 32) for s in weight.shape)
    quantised = {k for k, v in stored.items() if v.dtype == torch.float8_e4m3fn}
    assert any(".experts.3.down_proj" in k for k in quantised) and any("kv_a_proj" in k for k in quantised)
    assert not any(k.endswith(("lm_head.weight", "embed_tokens.weight", "gate.weight", "norm.weight"))
                   for k in quantised)

    # FP8 = the bf16 weights rounded to e4m3 per 32x32 block: relative error <= 2^-4 for normal
    # values, absolute <= scale * 2^-10 in the subnormal range
    bf16_weights, fp8_weights = dequantized_state_dict(bf16), dequantized_state_dict(fp8)
    assert bf16_weights.keys() == fp8_weights.keys()
    for name in quantised:
        w, q = bf16_weights[name], fp8_weights[name]
        scale = stored[name + "_scale_inv"].repeat_interleave(32, 0)[:w.shape[0]].repeat_interleave(32, 1)[:, :w.shape[1]]
        bound = torch.maximum(w.abs() * 2.0 ** -4, scale * 2.0 ** -10) * 1.001
        assert ((q - w).abs() <= bound).all(), name
        assert 0 < (q - w).norm() / w.norm() < 0.05, name
    # transformers reads the FP8 checkpoint exactly as the project's Megatron loader does
    from megatron_easyep.mcore.model import load_megatron_model

    _, megatron_fp8 = load_megatron_model(fp8, dtype=torch.float32)
    _assert_close(_hf_logits(fp8), _megatron_logits(megatron_fp8), "fp8 transformers vs Megatron")


def test_writer_refuses_incomplete_models_and_existing_dirs(random_model, tmp_path):
    from megatron_easyep.mcore.to_hf import HFWriteError, megatron_to_hf_tensors, write_hf_checkpoint
    from megatron_easyep.checkpoint.reader import DeepseekV3Config

    config, model = random_model
    bigger = dict(config, n_routed_experts=32, n_group=4)  # the model holds only 16 experts
    with pytest.raises(HFWriteError, match="no Megatron source"):
        megatron_to_hf_tensors(model, DeepseekV3Config.from_dict(bigger))
    with pytest.raises(HFWriteError, match="MTP"):
        write_hf_checkpoint(model, dict(config, num_nextn_predict_layers=1), tmp_path / "mtp")
    assert not (tmp_path / "mtp").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep")
    with pytest.raises(FileExistsError):
        write_hf_checkpoint(model, config, tmp_path / "busy")
    assert (tmp_path / "busy" / "x").read_text() == "keep"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_trained_fp8_checkpoint_evaluates_like_the_live_model(trained_run, tmp_path):
    """The FP8 checkpoint training wrote, evaluated as the demo does (launch/evaluate.py, 2 torchrun
    ranks, expert parallel 2), gives the held-out loss training measured on its live fp32 model.
    (The demo script itself runs on the shipped model: tests/test_demo_model.py.)"""
    import os
    import subprocess

    out, report = trained_run
    demos = [f"{out}/demos/{d}_heldout.jsonl:{d}" for d in ("code", "prose", "math")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(REPO / "launch" / "evaluate.py"), "--hf-checkpoint", str(out / "hf-fp8"), "--expert-parallel", "2",
           "--json", str(tmp_path / "eval.json")]
    for spec in demos:
        cmd += ["--demos", spec]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    full = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert set(full) == {"code", "prose", "math"}
    for domain, r in full.items():
        assert r["tokens"] == report["heldout"]["final"][domain]["tokens"]
        assert r["nll"] == pytest.approx(report["heldout"]["final"][domain]["loss"], abs=0.1)
