"""An independent EASY-EP scorer on stock transformers' DeepseekV3ForCausalLM (fp32), for tests.

Written from the method note (shared/reference/easyep-method.md) against transformers 5.23's
modeling_deepseek_v3.py, sharing no code with megatron_easyep.scoring.metrics / megatron_easyep.scoring.run:

* ``DeepseekV3DecoderLayer.forward`` does ``residual = hidden_states`` right before
  ``post_attention_layernorm``, so a forward pre-hook on that norm sees h (the residual stream
  after the attention add, before the MoE add).
* ``DeepseekV3MoE.forward`` receives the normed hidden states x and calls
  ``self.gate(x) -> (router_logits, topk_weights, topk_indices)``: topk_weights are the final
  combine weights g (unbiased sigmoid scores of the chosen experts, renormalised, times
  routed_scaling_factor), [T, k] each. A forward hook on ``mlp.gate`` reads them.
* ``DeepseekV3Experts`` is a fused module (``gate_up_proj`` [E, 2F, H], ``down_proj`` [E, H, F])
  whose forward(x, top_k_index, top_k_weights) returns sum_j w_j * expert_{idx_j}(x). Calling it on
  ONE token with index [[i]] and weight [[1.0]] gives the raw output e_i(x) of expert i through
  transformers' own expert code (whatever experts implementation is active).

Then, token by token, in Python floats (float64 sums):
    h~ = h + sum_i g_i e_i            (routed experts only)
    s  = max(0, 1 - cos(h, h~))       (cos from fp32 tensors: dot / (|h| |h~|))
    easyep += g |e| s ; easyep_no_token += g |e| ; easyep_no_norm += g s ; gate += g ; frequency += 1
"""

from __future__ import annotations

import math

import torch

from hf_oracle import load_transformers_model

METRIC_NAMES = ("easyep", "easyep_no_token", "easyep_no_norm", "gate", "frequency")


def _moe_layers(model) -> list[int]:
    return [i for i, layer in enumerate(model.model.layers)
            if type(layer.mlp).__name__ == "DeepseekV3MoE"]


def hf_expert_scores(ckpt_dir, demos, *, model=None):
    """demos: iterable of (input_ids, domain). Returns (scores, layers, tokens) where scores is
    {metric: [L, E] float64, metric@domain: [L, E] float64}, layers the HF indices of the MoE
    layers (row order) and tokens {domain: token count, "all": total}."""
    if model is None:
        model = load_transformers_model(ckpt_dir, dtype=torch.float32)
    layers = _moe_layers(model)
    num_experts = model.config.n_routed_experts
    demos = [(list(ids), domain) for ids, domain in demos]
    domains = list(dict.fromkeys(domain for _, domain in demos))
    # sums[domain][metric][row][expert], plain Python floats
    sums = {d: {m: [[0.0] * num_experts for _ in layers] for m in METRIC_NAMES} for d in domains}
    tokens = {d: 0 for d in domains}

    captured: dict[int, dict] = {}
    handles = []
    for layer_index in layers:
        layer = model.model.layers[layer_index]
        seen = captured.setdefault(layer_index, {})

        def h_hook(module, args, seen=seen):
            seen["h"] = args[0].detach().clone()

        def x_hook(module, args, seen=seen):
            seen["x"] = args[0].detach().clone()

        def gate_hook(module, args, output, seen=seen):
            _, weights, indices = output
            seen["g"] = weights.detach().clone()
            seen["idx"] = indices.detach().clone()

        handles.append(layer.post_attention_layernorm.register_forward_pre_hook(h_hook))
        handles.append(layer.mlp.register_forward_pre_hook(x_hook))
        handles.append(layer.mlp.gate.register_forward_hook(gate_hook))

    try:
        with torch.no_grad():
            for ids, domain in demos:
                tokens[domain] += len(ids)
                model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False)
                for row, layer_index in enumerate(layers):
                    seen = captured[layer_index]
                    _score_layer(model.model.layers[layer_index].mlp, seen, sums[domain], row)
                    seen.clear()
    finally:
        for handle in handles:
            handle.remove()

    scores = {}
    for metric in METRIC_NAMES:
        total = torch.zeros(len(layers), num_experts, dtype=torch.float64)
        for domain in domains:
            per_domain = torch.tensor(sums[domain][metric], dtype=torch.float64)
            scores[f"{metric}@{domain}"] = per_domain
            total += per_domain
        scores[metric] = total
    tokens["all"] = sum(tokens[d] for d in domains)
    return scores, layers, tokens


def _score_layer(moe, seen, sums, row) -> None:
    hidden = seen["h"].shape[-1]
    h_all = seen["h"].reshape(-1, hidden).float()
    x_all = seen["x"].reshape(-1, hidden).float()
    g_all, idx_all = seen["g"].float(), seen["idx"]
    assert g_all.shape[0] == h_all.shape[0] == x_all.shape[0]
    routed_all = torch.zeros_like(h_all)
    for t in range(h_all.shape[0]):
        h, x = h_all[t], x_all[t]
        picks = []
        h_tilde = h.clone()
        for j in range(idx_all.shape[1]):
            i = int(idx_all[t, j])
            g = float(g_all[t, j])
            e = moe.experts(x[None], torch.tensor([[i]]), torch.ones(1, 1))[0]  # raw e_i(x)
            h_tilde = h_tilde + g * e
            routed_all[t] += g * e
            picks.append((i, g, float(torch.linalg.vector_norm(e))))
        cos = float(torch.dot(h, h_tilde) / (torch.linalg.vector_norm(h) * torch.linalg.vector_norm(h_tilde)))
        s = max(0.0, 1.0 - cos)
        for i, g, e_norm in picks:
            sums["easyep"][row][i] += g * e_norm * s
            sums["easyep_no_token"][row][i] += g * e_norm
            sums["easyep_no_norm"][row][i] += g * s
            sums["gate"][row][i] += g
            sums["frequency"][row][i] += 1.0
    # Self-check of the oracle: the per-token recomputation equals what the stock experts module
    # produced for the whole sequence with the gate's own routing.
    fused = moe.experts(x_all, idx_all, seen["g"])
    err = float((fused - routed_all).abs().max())
    scale = float(fused.abs().max()) or 1.0
    assert err <= 1e-5 * scale, f"per-expert recomputation differs from the fused experts: {err}"
    assert math.isfinite(err)
