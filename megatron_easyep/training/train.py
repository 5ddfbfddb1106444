"""Train a small DeepSeek-V3-architecture MoE with Megatron-Core on offline text, on CPU.

The model is Megatron-Core's own GPTModel built by `model.transformer_config` / `model.build_model`
from a DeepSeek config.json dict (MLA, sigmoid router with expert bias, group-limited top-k, a
shared expert, first layer dense), initialised randomly: `transformer_config` sets
perform_initialization=False because weights are normally loaded, so training overrides it with
``dataclasses.replace(tcfg, perform_initialization=True, ...)`` (plus the optional sequence-wise
auxiliary loss DeepSeek-V3 uses at a tiny weight).

Training: plain ``torch.optim.AdamW`` (Megatron's optimizer hard-codes CUDA), linear warmup then
cosine decay to ``min_lr_ratio``, grad-norm clipping, fp32. After every optimizer step the router
expert bias is updated the aux-loss-free way with Megatron's own rule
(``moe_utils.get_updated_expert_bias``: bias += rate * sign(mean load - load), from the
``local_tokens_per_expert`` counters the router fills while gradients are on) and the counters are
reset, exactly what Megatron's finalize_model_grads does. Each batch row is a random window of one
domain's training token stream, domains dealt round-robin so every batch is balanced.

Reproducibility: ``seed`` fixes the corpus split, the math text, the model initialisation and the
batch order; the same seed, step count and thread count give the same weights on one machine.
``minutes`` is a convenience: the step count is fixed after a few timed steps (during warmup,
whose learning rate does not depend on the total) and written to the report, so ``steps=N``
reproduces the run exactly.

The run directory (`run_training`) holds: ``hf/`` (BF16 HF checkpoint + tokenizer), ``hf-fp8/``
(with ``fp8=True``), ``megatron/`` (the GPTModel state dict, config.json and tokenizer.json, the
converter's input), ``demos/{domain}_{heldout,calib}.jsonl`` and ``report.json``: held-out
perplexity per domain (at init, at the end, and re-measured from the written checkpoints),
routing specialisation per MoE layer (token share per expert per domain, usage entropy, JS
divergence between domains, load balance) at init and at the end, the loss curve and timings.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import resource
import shutil
import sys
import time
from typing import Any

import numpy as np
import torch

from megatron_easyep.training import corpus as corpus_lib
from megatron_easyep.mcore import to_hf
from megatron_easyep.mcore import compat
from megatron_easyep.checkpoint.reader import DeepseekV3Config
from megatron_easyep.checkpoint import io
from megatron_easyep.checkpoint.deepseek import deepseek_v3_config

# Model (config.json overrides of DeepSeek-V3's config.json) and training defaults.
PRESETS: dict[str, dict[str, Any]] = {
    # shared/reference/training-on-cpu.md: ~8 M parameters, ~0.5 s/step on 2 cores.
    "default": {
        "model": dict(vocab_size=4096, hidden_size=256, intermediate_size=512,
                      moe_intermediate_size=128, num_hidden_layers=4, first_k_dense_replace=1,
                      num_attention_heads=4, n_routed_experts=16, n_shared_experts=1,
                      num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                      q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                      v_head_dim=32, max_position_embeddings=1024, rope_scaling=None,
                      num_nextn_predict_layers=0, rms_norm_eps=1e-6),
        "train": dict(batch_size=16, seq_length=128, lr=3e-3, warmup_steps=30, steps=900,
                      max_bytes_per_domain=None, math_documents=corpus_lib.DEFAULT_MATH_DOCUMENTS,
                      heldout_demos=256, calib_demos=64, eval_every=100, eval_subset=32,
                      num_shards=2, threads=None, tokenizer_bytes_per_domain=2_000_000),
    },
    # Seconds, for tests: a few hundred KB of text per domain, hidden 64.
    "ci": {
        "model": dict(vocab_size=1024, hidden_size=64, intermediate_size=128,
                      moe_intermediate_size=32, num_hidden_layers=3, first_k_dense_replace=1,
                      num_attention_heads=4, n_routed_experts=16, n_shared_experts=1,
                      num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                      q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                      v_head_dim=16, max_position_embeddings=256, rope_scaling=None,
                      num_nextn_predict_layers=0, rms_norm_eps=1e-6),
        "train": dict(batch_size=8, seq_length=64, lr=3e-3, warmup_steps=5, steps=30,
                      max_bytes_per_domain=150_000, math_documents=300, heldout_demos=16,
                      calib_demos=8, eval_every=0, eval_subset=16, num_shards=2, threads=1,
                      tokenizer_bytes_per_domain=None),
    },
}


@dataclasses.dataclass
class TrainConfig:
    output: str | os.PathLike | None = None
    preset: str = "default"
    seed: int = 0
    steps: int | None = None  # default: the preset's (ignored when minutes is given)
    minutes: float | None = None
    batch_size: int | None = None
    seq_length: int | None = None
    lr: float | None = None
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float = 1.0
    bias_update_rate: float = 1e-3  # Megatron's moe_router_bias_update_rate default
    seq_aux_loss_coeff: float = 1e-4  # DeepSeek-V3's sequence-wise balance loss weight; 0 = off
    eval_every: int | None = None
    eval_subset: int | None = None
    heldout_demos: int | None = None
    calib_demos: int | None = None
    max_bytes_per_domain: int | None = None
    math_documents: int | None = None
    man_pages: int = 0
    heldout_fraction: float = corpus_lib.DEFAULT_HELDOUT_FRACTION
    tokenizer_bytes_per_domain: int | None = None
    fp8: bool = False
    fp8_block_size: tuple[int, int] | None = None
    num_shards: int | None = None
    check_transformers: bool = True  # re-measure perplexity with stock transformers if installed
    overwrite: bool = False
    log_every: int = 25
    # torch threads; None = torch's default (one per core). On an oversubscribed machine OpenMP
    # barriers make 2 threads far slower than 1 for small matrices; the ci preset uses 1.
    threads: int | None = None
    quiet: bool = False

    def resolved(self) -> "TrainConfig":
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; known: {', '.join(PRESETS)}")
        values = dataclasses.asdict(self)
        for key, default in PRESETS[self.preset]["train"].items():
            if values.get(key) is None:
                values[key] = default
        if self.minutes is not None:
            if self.minutes <= 0:
                raise ValueError(f"--minutes must be positive, got {self.minutes}")
            values["steps"] = None  # decided after timing the first steps
            if values["warmup_steps"] < 6:
                raise ValueError("--minutes needs --warmup-steps >= 6 (the step count is fixed "
                                 "after 6 timed warmup steps)")
        elif values["steps"] < 1:
            raise ValueError(f"--steps must be >= 1, got {values['steps']}")
        return TrainConfig(**values)


def model_config(preset: str, vocab_size: int | None = None) -> dict:
    """The full DeepSeek config.json dict of a preset (every DeepSeek-V3 key)."""
    overrides = dict(PRESETS[preset]["model"])
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    return deepseek_v3_config(fp8=False, source=f"training preset {preset!r}", **overrides)


def build_training_model(cfg: DeepseekV3Config, *, seed: int, seq_aux_loss_coeff: float = 0.0):
    """GPTModel from model.py with random initialisation (global torch RNG seeded with `seed`)."""
    from megatron_easyep.mcore.model import build_model, transformer_config

    tcfg = transformer_config(cfg, dtype=torch.float32, expert_parallel=1)
    tcfg = dataclasses.replace(
        tcfg, perform_initialization=True,
        moe_router_load_balancing_type="seq_aux_loss" if seq_aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=seq_aux_loss_coeff)
    compat.seed_model_parallel_rng(seed)
    model = build_model(cfg, tcfg)
    return model.train()


def routers(model) -> list:
    return list(compat.moe_routers(model).values())


@torch.no_grad()
def update_expert_bias(model, rate: float) -> None:
    """Aux-loss-free balancing, as Megatron's finalize_model_grads: bias += rate * sign(mean load -
    load) from the counts gathered since the last update; then reset the counts."""
    compat.update_expert_bias(routers(model), rate)


def train_step(model, optimizer, inputs, labels, position_ids, *, clip_grad: float,
               bias_update_rate: float) -> tuple[float, float]:
    """One optimizer step on a [B, S] batch (mean token cross-entropy, plus the router's
    sequence-wise aux loss when configured, which Megatron attaches to the graph), then the
    expert-bias update. Returns (loss, grad norm before clipping)."""
    loss = model(inputs, position_ids, None, labels=labels).mean()
    loss.backward()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    update_expert_bias(model, bias_update_rate)
    return loss.item(), grad_norm


def make_optimizer(model, *, lr: float, weight_decay: float, betas=(0.9, 0.95)):
    """Plain AdamW (Megatron's optimizer hard-codes CUDA); no decay on norms and the 1-D weights."""
    return torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=1e-8)


@torch.no_grad()
def shift_expert_bias_nonnegative(model) -> dict[str, float]:
    """Subtract each MoE layer's smallest expert bias from all of its biases (when negative).

    Routing is unchanged: a per-layer constant c moves every choice score by c, every group
    score (sum of a group's top-2) by 2c, so the same groups and experts win; the gate weights
    use the unbiased scores. But afterwards every choice score sigmoid(x) + bias is positive, so
    engines that mask unselected groups with 0.0 (DeepSeek's reference code, vLLM) pick the same
    experts as those that mask with -inf (Megatron, transformers 5) -- with a negative choice
    score a masked expert's 0.0 could win. Returns {router name: shift}."""
    shifts = {}
    for index, layer in compat.iter_moe_layers(model):
        bias = layer.mlp.router.expert_bias
        low = float(bias.min())
        if low < 0:
            bias.sub_(low)
            shifts[f"decoder.layers.{index}"] = -low
    return shifts


class BatchSampler:
    """Random windows of seq_length+1 tokens from each domain's training stream; row r of step s
    comes from domain (s * batch + r) mod n_domains. Deterministic in the seed."""

    def __init__(self, streams: dict[str, np.ndarray], batch_size: int, seq_length: int, seed: int):
        self.domains = list(streams)
        self.streams = {d: torch.from_numpy(s.astype(np.int64)) for d, s in streams.items()}
        for d, s in self.streams.items():
            if len(s) < seq_length + 2:
                raise ValueError(f"domain {d}: {len(s)} training tokens, fewer than one window")
        self.batch_size, self.seq_length = batch_size, seq_length
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for r in range(self.batch_size):
            stream = self.streams[self.domains[(self.step * self.batch_size + r) % len(self.domains)]]
            start = int(torch.randint(0, len(stream) - self.seq_length - 1, (1,), generator=self.generator))
            rows.append(stream[start:start + self.seq_length + 1])
        self.step += 1
        batch = torch.stack(rows)
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()


# --------------------------------------------------------------------------------------------
# evaluation: held-out loss and routing statistics per domain
# --------------------------------------------------------------------------------------------

class RoutingStats:
    """Per MoE layer and domain: expert selection counts, tokens, summed per-token gate entropy."""

    def __init__(self):
        self.counts: dict[int, dict[str, torch.Tensor]] = {}
        self.tokens: dict[int, dict[str, int]] = {}
        self.gate_entropy: dict[int, dict[str, float]] = {}
        self.domain: str | None = None
        self.mask: torch.Tensor | None = None  # [T] bool in Megatron's (s, b) token order

    def observe(self, layer: int, obs) -> None:
        routing_map = obs.routing_map[self.mask]
        probs = obs.probs[self.mask].double()
        counts = self.counts.setdefault(layer, {})
        counts[self.domain] = counts.get(self.domain, 0) + routing_map.sum(0).double()
        tokens = self.tokens.setdefault(layer, {})
        tokens[self.domain] = tokens.get(self.domain, 0) + int(routing_map.shape[0])
        p = probs / probs.sum(-1, keepdim=True)
        h = -(p * torch.log2(p.clamp_min(1e-30))).sum(-1)
        ent = self.gate_entropy.setdefault(layer, {})
        ent[self.domain] = ent.get(self.domain, 0.0) + float(h.sum())

    def summary(self) -> dict:
        out = {}
        for layer in sorted(self.counts):
            domains = list(self.counts[layer])
            usage = {d: self.counts[layer][d] / self.counts[layer][d].sum() for d in domains}
            pooled = sum(self.counts[layer][d] for d in domains)
            entry = {
                # fraction of the domain's tokens that select each expert (sums to top-k)
                "token_share": {d: [round(float(v), 5) for v in self.counts[layer][d] / self.tokens[layer][d]]
                                for d in domains},
                # entropy (bits) of the domain's expert-usage distribution; max log2(E)
                "usage_entropy_bits": {d: round(_entropy_bits(usage[d]), 4) for d in domains},
                # mean entropy (bits) of one token's normalised top-k gate weights; max log2(k)
                "token_gate_entropy_bits": {d: round(self.gate_entropy[layer][d] / self.tokens[layer][d], 4)
                                            for d in domains},
                "js_divergence_bits": {f"{a}|{b}": round(_js_bits(usage[a], usage[b]), 4)
                                       for i, a in enumerate(domains) for b in domains[i + 1:]},
                "top_experts": {d: [int(e) for e in torch.argsort(usage[d], descending=True)[:4]]
                                for d in domains},
                "load_max_over_mean": round(float(pooled.max() / pooled.mean()), 4),
                "tokens": dict(self.tokens[layer]),
            }
            out[str(layer)] = entry
        return out


def _entropy_bits(p: torch.Tensor) -> float:
    p = p[p > 0]
    return float(-(p * torch.log2(p)).sum())


def _js_bits(p: torch.Tensor, q: torch.Tensor) -> float:
    m = (p + q) / 2
    return 0.5 * _kl_bits(p, m) + 0.5 * _kl_bits(q, m)


def _kl_bits(p, q) -> float:
    mask = p > 0
    return float((p[mask] * torch.log2(p[mask] / q[mask])).sum())


@torch.no_grad()
def evaluate(model, demos: dict[str, list[list[int]]], *, batch_size: int = 16,
             routing: bool = True) -> tuple[dict, dict | None]:
    """Teacher-forced loss on each domain's demos (token 0 predicts nothing; every later token is
    predicted from its prefix). Returns ({domain: {loss, ppl, tokens}}, routing summary)."""
    was_training = model.training
    model.eval()
    stats = RoutingStats() if routing else None
    detach = compat.attach_moe_observers(model, stats.observe) if routing else None
    device = next(model.parameters()).device
    results = {}
    try:
        for domain, seqs in demos.items():
            total, count = 0.0, 0
            for i in range(0, len(seqs), batch_size):
                chunk = seqs[i:i + batch_size]
                length = max(len(s) for s in chunk)
                ids = torch.zeros(len(chunk), length, dtype=torch.long)
                valid = torch.zeros(len(chunk), length, dtype=torch.bool)
                for row, s in enumerate(chunk):
                    ids[row, :len(s)] = torch.tensor(s)
                    valid[row, :len(s)] = True
                inputs, labels = ids[:, :-1], ids[:, 1:]
                label_mask = valid[:, 1:]
                if stats is not None:
                    stats.domain = domain
                    stats.mask = valid[:, :-1].t().reshape(-1)  # Megatron flattens tokens (s, b)
                position_ids = torch.arange(length - 1).unsqueeze(0).expand(len(chunk), -1)
                loss = model(inputs.to(device), position_ids.to(device), None,
                             labels=labels.to(device)).float().cpu()
                total += float(loss[label_mask].sum())
                count += int(label_mask.sum())
            mean = total / max(count, 1)
            results[domain] = {"loss": round(mean, 5), "ppl": round(math.exp(mean), 4), "tokens": count}
    finally:
        if detach is not None:
            detach()
        model.train(was_training)
    return results, (stats.summary() if stats is not None else None)


def transformers_heldout(ckpt_dir, demos: dict[str, list[list[int]]]) -> dict | None:
    """Per-domain held-out loss of a written checkpoint in stock transformers (fp32), or None
    when transformers is not installed."""
    try:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging
    except ImportError:
        return None
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(ckpt_dir, dtype=torch.float32).eval()
    out = {}
    with torch.no_grad():
        for domain, seqs in demos.items():
            total, count = 0.0, 0
            for s in seqs:
                ids = torch.tensor([s])
                logits = model(ids).logits[0, :-1].float()
                total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
                count += len(s) - 1
            out[domain] = {"loss": round(total / count, 5), "ppl": round(math.exp(total / count), 4),
                           "tokens": count}
    return out


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------

def _lr_lambda(warmup: int, total: int, min_ratio: float):
    def f(step: int) -> float:  # multiplier for the step about to be taken (0-based)
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def count_parameters(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for n, p in model.named_parameters() if ".local_experts." in n)
    return {"total": total, "routed_experts": routed}


def eager_megatron():
    """Context in which Megatron-Core's @jit_fuser functions (torch.compile since torch 2.2, e.g.
    TopKRouter._apply_expert_bias) run eagerly. On CPU, Inductor compiles them with the C++
    compiler on first use and again when shapes change: ~10 s per process for a few tiny
    element-wise functions. Numerics are unchanged (they are eager PyTorch ops either way)."""
    return compat.eager_fusions()


def run_training(tc: TrainConfig) -> dict:
    """Corpus -> tokenizer -> train -> evaluate -> write checkpoints and report into tc.output.
    Returns the report dict. torch.distributed / parallel_state are initialised here (EP 1)."""
    tc = tc.resolved()
    threads = torch.get_num_threads()
    if tc.threads:
        torch.set_num_threads(tc.threads)
    try:
        with eager_megatron():
            return _run_training(tc)
    finally:
        torch.set_num_threads(threads)


def _run_training(tc: TrainConfig) -> dict:
    from megatron_easyep.mcore.parallel import init_parallel
    from megatron_easyep.mcore.model import load_megatron_model

    if tc.output is None:
        raise ValueError("an output directory is required")
    out_dir = pathlib.Path(tc.output)
    io.check_output(out_dir, tc.overwrite)
    log = (lambda *a: None) if tc.quiet else (lambda *a: print(*a, flush=True))
    t_start = time.time()
    timings: dict[str, float] = {}

    # corpus and tokenizer
    t0 = time.time()
    corpus = corpus_lib.build_corpus(tc.seed, heldout_fraction=tc.heldout_fraction,
                                     max_bytes_per_domain=tc.max_bytes_per_domain,
                                     math_document_count=tc.math_documents, man_pages=tc.man_pages)
    vocab_size = PRESETS[tc.preset]["model"]["vocab_size"]
    tokenizer = corpus_lib.train_tokenizer(corpus, vocab_size, tc.tokenizer_bytes_per_domain)
    tokenizer_json = tokenizer.to_str()
    streams, corpus_stats = {}, corpus.summary()
    for domain in corpus.domains:
        streams[domain] = corpus_lib.token_stream(corpus_lib.encode_documents(tokenizer, corpus.train[domain]))
        corpus_stats[domain]["train_tokens"] = int(len(streams[domain]))
        corpus_stats[domain]["train_bytes_per_token"] = round(corpus_stats[domain]["train_bytes"] / len(streams[domain]), 3)
    timings["corpus_and_tokenizer_s"] = round(time.time() - t0, 2)
    log(f"corpus + tokenizer: {timings['corpus_and_tokenizer_s']} s; "
        + ", ".join(f"{d}: {s['train_tokens']} train tokens, {s['heldout_documents']} held-out docs"
                    for d, s in corpus_stats.items()))

    tmp_dir = io.new_staging_dir(out_dir)
    try:
        demo_paths = corpus_lib.write_demo_files(tmp_dir / "demos", tokenizer, corpus,
                                                 length=tc.seq_length, heldout_per_domain=tc.heldout_demos,
                                                 calib_per_domain=tc.calib_demos)
        (tmp_dir / "corpus_manifest.json").write_text(json.dumps(corpus.manifest(), indent=1) + "\n")
        heldout = {d: corpus_lib.read_demo_file(demo_paths[f"{d}_heldout"]) for d in corpus.domains}
        heldout_subset = {d: v[:tc.eval_subset] for d, v in heldout.items()}

        # model
        config = model_config(tc.preset)
        cfg = DeepseekV3Config.from_dict(config, source=f"training preset {tc.preset!r}")
        init_parallel(1, seed=tc.seed)
        model = build_training_model(cfg, seed=tc.seed, seq_aux_loss_coeff=tc.seq_aux_loss_coeff)
        params = count_parameters(model)
        log(f"model: {params['total'] / 1e6:.2f} M parameters ({params['routed_experts'] / 1e6:.2f} M in "
            f"routed experts), {cfg.num_hidden_layers} layers, {cfg.n_routed_experts} experts top-"
            f"{cfg.num_experts_per_tok}, {cfg.n_group} groups / top-{cfg.topk_group}")

        t0 = time.time()
        init_eval, init_routing = evaluate(model, heldout)
        timings["init_eval_s"] = round(time.time() - t0, 2)
        log("init held-out loss: " + ", ".join(f"{d} {r['loss']:.3f}" for d, r in init_eval.items()))

        optimizer = make_optimizer(model, lr=tc.lr, weight_decay=tc.weight_decay, betas=tc.betas)
        sampler = BatchSampler(streams, tc.batch_size, tc.seq_length, seed=tc.seed)
        position_ids = torch.arange(tc.seq_length).unsqueeze(0).expand(tc.batch_size, -1)
        steps = tc.steps
        curve, step_times = [], []
        t_train = time.time()
        step = 0
        while steps is None or step < steps:
            lr_now = tc.lr * _lr_lambda(tc.warmup_steps, steps or 10**9, tc.min_lr_ratio)(step)
            for group in optimizer.param_groups:
                group["lr"] = lr_now
            t_step = time.time()
            inputs, labels = sampler.next()
            loss, grad_norm = train_step(model, optimizer, inputs, labels, position_ids,
                                         clip_grad=tc.clip_grad, bias_update_rate=tc.bias_update_rate)
            step_times.append(time.time() - t_step)
            step += 1
            if steps is None and step == 6:
                # warmup_steps >= 6 keeps these steps' learning rates independent of the total
                per_step = sum(step_times[1:]) / len(step_times[1:])
                steps = max(step + 1, int(tc.minutes * 60 / per_step))
                log(f"--minutes {tc.minutes}: {per_step * 1000:.0f} ms/step -> {steps} steps "
                    f"(reproduce with --steps {steps})")
            point = {"step": step, "train_loss": round(loss, 4), "lr": lr_now,
                     "grad_norm": round(grad_norm, 4)}
            if tc.eval_every and (step % tc.eval_every == 0 or step == steps):
                point["heldout_loss"] = {d: r["loss"] for d, r in
                                         evaluate(model, heldout_subset, routing=False)[0].items()}
            curve.append(point)
            if step % tc.log_every == 0 or step == steps or "heldout_loss" in point:
                elapsed = time.time() - t_train
                log(f"step {step}/{steps}: loss {loss:.3f}, lr {lr_now:.2e}, "
                    f"{step * tc.batch_size * tc.seq_length / elapsed:.0f} tok/s"
                    + (f", held-out {point['heldout_loss']}" if "heldout_loss" in point else ""))
        timings["train_s"] = round(time.time() - t_train, 2)
        bias_shift = shift_expert_bias_nonnegative(model)

        t0 = time.time()
        final_eval, final_routing = evaluate(model, heldout)
        timings["final_eval_s"] = round(time.time() - t0, 2)
        log("final held-out loss: " + ", ".join(f"{d} {r['loss']:.3f} (ppl {r['ppl']:.2f})"
                                                for d, r in final_eval.items()))

        # write: Megatron state, HF BF16 (and FP8), then measure what was written
        t0 = time.time()
        to_hf.save_megatron_state(model, config, tmp_dir / "megatron", tokenizer_json=tokenizer_json)
        written = {"bf16": to_hf.write_hf_checkpoint(model, config, tmp_dir / "hf", dtype="bfloat16",
                                                         num_shards=tc.num_shards, tokenizer_json=tokenizer_json)}
        if tc.fp8:
            written["fp8"] = to_hf.write_hf_checkpoint(
                model, config, tmp_dir / "hf-fp8", dtype="bfloat16", fp8=True,
                weight_block_size=tc.fp8_block_size, num_shards=tc.num_shards, tokenizer_json=tokenizer_json)
        timings["write_s"] = round(time.time() - t0, 2)

        t0 = time.time()
        # the written checkpoints, read back by the project's loader (and stock transformers), on
        # the first eval_subset held-out demos of each domain, next to the trained model on them
        checks = {"demos_per_domain": tc.eval_subset,
                  "trained_model": evaluate(model, heldout_subset, routing=False)[0]}
        for name, path in written.items():
            _, loaded = load_megatron_model(path, dtype=torch.float32)
            checks[f"megatron_{name}_checkpoint"] = evaluate(loaded, heldout_subset, routing=False)[0]
            del loaded
        if tc.check_transformers:
            hf = transformers_heldout(written["bf16"], heldout_subset)
            checks["transformers_bf16_checkpoint"] = hf if hf is not None else "transformers not installed"
        timings["reload_eval_s"] = round(time.time() - t0, 2)

        report = {
            "format": "megatron-easyep-training-report/1",
            "command": " ".join(sys.argv),
            "train_config": {k: (list(v) if isinstance(v, tuple) else v)
                             for k, v in dataclasses.asdict(tc).items() if k != "output"},
            "steps": steps,
            # same weights on the same machine / torch build (thread count changes float sums)
            "reproduce": f"python launch/train_tiny.py --preset {tc.preset} --seed {tc.seed} --steps {steps} "
                         f"--threads {torch.get_num_threads()}" + (" --fp8" if tc.fp8 else ""),
            "model": {"config": config, "parameters": params},
            "corpus": {"sources": corpus.sources, "domains": corpus_stats,
                       "tokenizer_vocab_size": tokenizer.get_vocab_size(),
                       "heldout_demos": {d: len(v) for d, v in heldout.items()},
                       "demo_length": tc.seq_length},
            "heldout": {"init": init_eval, "final": final_eval},
            "checkpoint_checks": checks,
            "routing": {
                "init": init_routing, "final": final_routing,
                "definitions": {
                    "token_share": "per MoE layer (HF layer index) and domain: fraction of the "
                                   "domain's held-out tokens that select each expert (sums to top-k)",
                    "usage_entropy_bits": "entropy of the domain's expert-usage distribution "
                                          "(token_share / top-k); uniform = log2(n_routed_experts)",
                    "token_gate_entropy_bits": "mean entropy of a token's renormalised top-k gate "
                                               "weights; max log2(top-k)",
                    "js_divergence_bits": "Jensen-Shannon divergence between two domains' usage "
                                          "distributions (0 = same experts, 1 = disjoint)",
                    "load_max_over_mean": "busiest expert's load / mean load, all domains pooled",
                }},
            "expert_bias_shift": {"shift_per_layer": bias_shift, "why": (
                "each MoE layer's expert bias was shifted by a constant after training so all "
                "are >= 0; routing is invariant to it (see training.shift_expert_bias_nonnegative)")},
            "curve": curve,
            "timings": {**timings, "total_s": round(time.time() - t_start, 2),
                        "ms_per_step": round(1000 * sum(step_times) / len(step_times), 1),
                        "tokens_per_s": round(len(step_times) * tc.batch_size * tc.seq_length
                                              / sum(step_times), 1),
                        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                        "torch_threads": torch.get_num_threads()},
            "outputs": {"hf_bf16": "hf", **({"hf_fp8": "hf-fp8"} if tc.fp8 else {}),
                        "megatron": "megatron", "demos": "demos", "corpus_manifest": "corpus_manifest.json"},
        }
        (tmp_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        io.publish(tmp_dir, out_dir, overwrite=tc.overwrite)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    log(f"wrote {out_dir} in {time.time() - t_start:.0f} s")
    return report
