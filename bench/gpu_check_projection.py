"""What the whole job takes for DeepSeek-V3 (checkpoint -> scores -> M=128 export) on the plan's
layouts, from the GPU check's figures: every input is tagged measured (with its source) or
estimate, so a new bench/results/gpu_check_<date>.json only replaces numbers.

    python bench/gpu_check_projection.py [--from gpu_check_<date>.json] [--demos 25] [--tokens 16384]

Model (per layout): wall = start + load + scoring + export, with
  load    = max(bytes one node reads from storage / storage GB/s, bytes one rank holds / loader GB/s)
  scoring = (micro-batches per replica + PP - 1) x layers of the largest stage x seconds per layer
            (one 16k-token micro-batch; EP > 1 adds the all-to-all: 2 x rows x hidden x 2 bytes / a2a GB/s)
  export  = bytes of the M=128 checkpoint / export GB/s (one process, reads and writes them once)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GIB = 1024 ** 3
# name: (value, provenance)
DEFAULTS = {
    # H200 (2026-12-01, bench/results/gpu_check_h200.json (c)): one V3-width MoE layer, 32 experts, FP8-
    # resident native, 8192 tokens, scorer attached: 192.5k tokens/s -> 42.6 ms; x2 for 16k tokens,
    # + 14 ms for attention's quadratic part (cuDNN 18.8 ms at 16k, (d)) -> ~0.10 s
    "layer_s_16k": (0.10, "estimate from measured H200 (c) 32-expert layer at 8k tokens and (d) attention at 16k"),
    "layer_s_16k_ep1": (0.125, "estimate: the 32-expert figure +25% for 256 local experts' loop"),
    "a2a_GBps": (150.0, "estimate: effective all-to-all per GPU over NVLink"),
    "storage_GBps": (2.0, "estimate: shared storage per node, conservative"),
    "loader_GBps": (2.0, "estimate: safetensors -> FP8-resident GPU weights per rank"),
    "export_GBps": (1.0, "measured on the 2-core CPU machine (small preset, page cache; README export row)"),
    "start_s": (30.0, "estimate: interpreter, Megatron import, model build, NCCL set-up"),
}


def from_gpu_check(path: Path) -> dict:
    """The measured figures of a GPU check (what it has; the rest stays estimated)."""
    report = json.loads(path.read_text())
    where = f"measured, {report['environment'].get('gpu', report['mode'])} {report['date']}"
    out = {}
    v3 = (report["phases"].get("v3") or {}).get("result") or {}
    gen = (report["phases"].get("v3_generate") or {}).get("result") or {}
    none = (v3.get("score") or {}).get("none") or {}
    if "scoring_loop_seconds" in none:
        layers = v3["moe_layers"] + 1
        per_layer = none["scoring_loop_seconds"] / v3["demos"] / layers * 16384 / v3["tokens_per_demo"]
        out["layer_s_16k_ep1"] = (per_layer, f"{where}: v3 --fp8 none, {v3['experts']} experts, EP=1")
        out["layer_s_16k"] = (per_layer, f"{where}: the EP=1 figure (32 local experts: an upper bound)")
        out["loader_GBps"] = (none["load_GBps"], f"{where}: v3 load (page cache)")
    if gen.get("cold_read"):
        out["storage_GBps"] = (gen["cold_read"]["GBps"], f"{where}: the lent machine's disk, cold read")
    if (v3.get("export") or {}).get("GBps"):
        out["export_GBps"] = (v3["export"]["GBps"], f"{where}: v3 export")
    return out


def layouts(cfg) -> list[dict]:
    from megatron_easyep.mcore import plan

    out = []
    for name, gpn, mem in (("2x8 H800 (80 GB)", 8, 79.6), ("1x8 H200 (141 GB)", 8, 139.0)):
        for layout in plan.scoring_layouts(cfg, gpus_per_node=gpn, gpu_memory_bytes=int(mem * GIB),
                                           dtype="fp8", tokens=16384)[:1]:
            out.append({"cluster": name, "layout": layout, "why": "plan.py's recommendation"})
        if gpn == 8 and mem > 100:  # the node's 8 GPUs at EP=8, when that fits too
            alt = [l for l in plan.scoring_layouts(cfg, gpus_per_node=gpn, gpu_memory_bytes=int(mem * GIB),
                                                   dtype="fp8", tokens=16384) if l.pp == 1 and l.ep == 8]
            out += [{"cluster": name, "layout": l, "why": "all 8 GPUs (EP=8): fits too"} for l in alt[:1]]
    return out


def project(cfg, fig: dict, row: dict, demos: int, tokens: int) -> dict:
    from megatron_easyep.mcore import plan

    l = row["layout"]
    v = {k: val for k, (val, _) in fig.items()}
    world = l.gpus
    dp = world // l.pp
    micro = math.ceil(demos / dp)
    per_layer = v["layer_s_16k_ep1"] if l.ep == 1 else v["layer_s_16k"]
    if l.ep > 1:  # dispatch + combine of this rank's rows
        per_layer += 2 * tokens * cfg.num_experts_per_tok * cfg.hidden_size * 2 / (v["a2a_GBps"] * 1e9)
    scoring = (micro + l.pp - 1) * max(l.stage_layers) * per_layer * tokens / 16384
    model = plan.model_size(cfg).bytes("fp8", scope="main")
    node_bytes = model / l.nodes
    load = max(node_bytes / (v["storage_GBps"] * 1e9), l.weights_bytes / (v["loader_GBps"] * 1e9))
    export = plan.model_size(cfg, 128).bytes("fp8") / (v["export_GBps"] * 1e9)
    wall = v["start_s"] + load + scoring + export
    return {"cluster": row["cluster"], "layout": f"PP={l.pp} x EP={l.ep} on {world} GPUs ({row['why']})",
            "load_s": load, "scoring_s": scoring, "tokens_per_s": demos * tokens / scoring,
            "export_s": export, "wall_s": wall}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", help="a GPU check JSON (bench/results/gpu_check_<date>.json)")
    p.add_argument("--demos", type=int, default=25)
    p.add_argument("--tokens", type=int, default=16384)
    args = p.parse_args(argv)
    from megatron_easyep.checkpoint.reader import DeepseekV3Config
    from megatron_easyep.checkpoint.tiny import DEEPSEEK_V3_CONFIG

    cfg = DeepseekV3Config.from_dict(dict(DEEPSEEK_V3_CONFIG, quantization_config={
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}))
    fig = dict(DEFAULTS) | (from_gpu_check(Path(args.source)) if args.source else {})
    print(f"DeepSeek-V3 FP8, {args.demos} demos x {args.tokens} tokens, keep M = 128\n")
    print("| input | value | source |\n|---|---:|---|")
    for k, (val, src) in fig.items():
        print(f"| {k} | {val:.3g} | {src} |")
    print("\n| cluster | layout | load s | scoring s | tokens/s | export s | wall (start+load+score+export) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in layouts(cfg):
        r = project(cfg, fig, row, args.demos, args.tokens)
        print(f"| {r['cluster']} | {r['layout']} | {r['load_s']:.0f} | {r['scoring_s']:.0f} | "
              f"{r['tokens_per_s']:.0f} | {r['export_s']:.0f} | {r['wall_s'] / 60:.1f} min |")


if __name__ == "__main__":
    main()
