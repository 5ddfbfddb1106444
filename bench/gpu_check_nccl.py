"""GPU check, phase 1: several NCCL ranks on one GPU (bench/gpu_check_run.py runs these).

nccl_smoke  -- prints torch.cuda.nccl.version() and picks the route: NCCL >= 2.30.3 lets ranks
               share a GPU with NCCL_MULTI_RANK_GPU_ENABLE=1 (NVLS off); older NCCL refuses
               ("Duplicate GPU detected") unless every rank has its own NCCL_HOSTID, set before the
               first NCCL call (mcore/parallel.py does it under EASYEP_NCCL_HOSTID_PER_RANK=1), and
               talks over sockets on lo. Then 4 ranks under torchrun, through the project's own
               init_parallel (EP=2 x PP=2 groups): all_reduce, all_to_all_single with uneven splits,
               batch_isend_irecv across stages and an all_reduce inside Megatron's EP group, values
               checked, median ms per collective. A failing route is recorded and the other tried.
nccl_layouts -- the real entry points on a small FP8 checkpoint (fp32): launch/score.py with EP=2
               alltoall, EP=2 allgather, DP=2, PP=2 and PP=2 x EP=2 (4 ranks), each against a 1-rank
               run on the same device: <= 1e-5 relative on every metric, frequency exact;
               launch/evaluate.py PP=2 logits and NLL against 1 rank.
The dry mode (CPU CI) runs the same code with gloo.

Worker:  python -m torch.distributed.run --nproc-per-node 4 bench/gpu_check_nccl.py smoke OUT_DIR
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check_lib as lib  # noqa: E402

sys.path.insert(0, str(lib.REPO))

RTOL = 1e-5
MULTI_RANK_MIN_NCCL = (2, 30, 3)
ROUTES = {
    # NCCL >= 2.30.3: experimental multi-rank-per-GPU support; NVLS must stay off (NVIDIA/nccl#1716)
    "multi-rank": {"EASYEP_SHARE_GPU": "1", "NCCL_MULTI_RANK_GPU_ENABLE": "1", "NCCL_NVLS_ENABLE": "0",
                   "NCCL_SOCKET_IFNAME": "lo", "NCCL_IB_DISABLE": "1", "GLOO_SOCKET_IFNAME": "lo"},
    # older NCCL: every rank its own "host" (NCCL_HOSTID), sockets on the loopback interface
    "hostid": {"EASYEP_SHARE_GPU": "1", "EASYEP_NCCL_HOSTID_PER_RANK": "1", "NCCL_NET": "Socket",
               "NCCL_SOCKET_IFNAME": "lo", "NCCL_IB_DISABLE": "1", "GLOO_SOCKET_IFNAME": "lo"},
    "gloo": {"GLOO_SOCKET_IFNAME": "lo"},  # dry mode: CPU tensors, the same code
}
SMOKE_RANKS = 4


def nccl_version() -> tuple[int, int, int] | None:
    import torch

    try:
        v = torch.cuda.nccl.version()
    except Exception:  # noqa: BLE001 - a CPU build has no NCCL
        return None
    if isinstance(v, int):  # old torch: 2.19.3 -> 21903
        return v // 10000, v // 100 % 100, v % 100
    return tuple(int(x) for x in v[:3])


def preferred_routes(version, forced: str | None) -> list[str]:
    if forced:
        return [forced]
    if version is None:
        return ["gloo"]
    if tuple(version) >= MULTI_RANK_MIN_NCCL:
        return ["multi-rank", "hostid"]
    return ["hostid", "multi-rank"]


# ------------------------------------------------------------------------------------------------
# the smoke worker (one process per rank)
# ------------------------------------------------------------------------------------------------

def _timed_ms(fn, sync, repeat=5) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def smoke_worker(out_dir: Path) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_easyep.mcore import parallel

    world = int(os.environ["WORLD_SIZE"])
    pp = 2 if world % 4 == 0 else 1
    layout = parallel.init_parallel(expert_parallel=2 if world // pp >= 2 else 1, pipeline_parallel=pp)
    rank = dist.get_rank()
    nccl = layout.backend == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    sync = torch.cuda.synchronize if nccl else (lambda: None)
    res = {"rank": rank, "backend": layout.backend, "device": str(device),
           "nccl_hostid": os.environ.get("NCCL_HOSTID"), "checks": []}

    x = torch.full((4096,), float(rank + 1), device=device)
    dist.all_reduce(x)
    lib.check(res["checks"], "all_reduce", bool((x == world * (world + 1) / 2).all()),
              f"got {float(x[0])}, expected {world * (world + 1) / 2}")
    res["all_reduce_ms"] = _timed_ms(lambda: dist.all_reduce(torch.ones(1 << 20, device=device)), sync)

    # uneven: rank r sends r + j + 1 values to rank j, each naming (source, destination, index)
    send = [rank + j + 1 for j in range(world)]
    recv = [j + rank + 1 for j in range(world)]
    inp = torch.cat([rank * 10000 + j * 100 + torch.arange(n, dtype=torch.float32) for j, n in enumerate(send)])
    out = torch.empty(sum(recv), device=device)
    dist.all_to_all_single(out, inp.to(device), recv, send)
    expect = torch.cat([j * 10000 + rank * 100 + torch.arange(n, dtype=torch.float32) for j, n in enumerate(recv)])
    lib.check(res["checks"], "all_to_all_single_uneven", torch.equal(out.cpu(), expect),
              f"splits send {send} recv {recv}; first mismatch at "
              f"{int((out.cpu() != expect).nonzero()[0]) if not torch.equal(out.cpu(), expect) else '-'}")
    res["all_to_all_ms"] = _timed_ms(lambda: dist.all_to_all_single(out, inp.to(device), recv, send), sync)

    # pipeline P2P: a ring, sends and receives in one batch (what P2PCommunicator issues)
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    sbuf = torch.full((1024,), float(rank), device=device)
    rbuf = torch.full((1024,), -1.0, device=device)

    def ring():
        ops = [dist.P2POp(dist.isend, sbuf, nxt), dist.P2POp(dist.irecv, rbuf, prv)]
        for req in dist.batch_isend_irecv(ops):
            req.wait()

    ring()
    sync()
    lib.check(res["checks"], "batch_isend_irecv_ring", bool((rbuf == prv).all()), f"got {float(rbuf[0])}, from {prv}")
    res["p2p_ms"] = _timed_ms(ring, sync)

    # Megatron's own groups: the EP group (inside one stage) sums its ranks' ids
    group = parallel_state.get_expert_model_parallel_group()
    members = dist.get_process_group_ranks(group)
    y = torch.tensor([float(rank)], device=device)
    dist.all_reduce(y, group=group)
    lib.check(res["checks"], "megatron_ep_group_all_reduce", float(y) == float(sum(members)),
              f"group {members}: got {float(y)}")
    res["layout"] = {"world_size": world, "pipeline_parallel": pp, "expert_parallel": layout.expert_parallel,
                     "pp_rank": layout.pp_rank, "ep_rank": layout.ep_rank}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(res))
    parallel.shutdown()


# ------------------------------------------------------------------------------------------------
# phases (run by bench/gpu_check_run.py in their own process)
# ------------------------------------------------------------------------------------------------

def phase_nccl_smoke(ctx: dict) -> dict:
    version = None if ctx["dry"] else nccl_version()
    routes = ["gloo"] if ctx["dry"] else preferred_routes(version, ctx.get("nccl_route"))
    print(f"torch.cuda.nccl.version() = {version}; routes to try: {routes}", flush=True)
    result = {"nccl_version": None if version is None else ".".join(map(str, version)),
              "routes_tried": [], "checks": []}
    deadline = time.monotonic() + ctx["timeout_s"] - 5
    for route in routes:
        out_dir = Path(ctx["workdir"]) / f"smoke_{route}"
        out_dir.mkdir(parents=True, exist_ok=True)
        env = lib.base_env(dict(ctx, route_env=ROUTES[route]))
        run = lib.run_cmd(lib.torchrun(SMOKE_RANKS) + [__file__, "smoke", out_dir],
                          timeout=min(ctx.get("smoke_attempt_s", 90), deadline - time.monotonic()), env=env)
        ranks = [json.loads(p.read_text()) for p in sorted(out_dir.glob("rank*.json"))]
        passed = run["rc"] == 0 and len(ranks) == SMOKE_RANKS and all(c["ok"] for r in ranks for c in r["checks"])
        attempt = {"route": route, "env": ROUTES[route], "run": run, "ranks": ranks, "ok": passed}
        result["routes_tried"].append(attempt)
        if passed:
            result.update(route=route, route_env=ROUTES[route],
                          ms={k: max(r[k] for r in ranks) for k in ("all_reduce_ms", "all_to_all_ms", "p2p_ms")})
            break
        if run["rc"] != 0:
            attempt["error"] = lib.failure_text(run)
        if deadline - time.monotonic() < 20:
            break
    lib.check(result["checks"], "a route passed every collective", "route" in result,
              "; ".join(f"{a['route']}: {'ok' if a['ok'] else a.get('error', 'value check failed')[:300]}"
                        for a in result["routes_tried"]))
    return result


def _tiny_fp8_checkpoint(workdir: Path) -> Path:
    from megatron_easyep.checkpoint.tiny import make_tiny_checkpoint

    path = workdir / "tiny_fp8"
    if not path.exists():  # partial 32 x 16 blocks, the parity tests' FP8 variant
        make_tiny_checkpoint(path, "tiny", fp8=True, num_shards=2, weight_block_size=[32, 16])
    return path


# name: (ranks, score.py arguments)
LAYOUTS = {
    "ep2_alltoall": (2, ["--expert-parallel", 2, "--dispatcher", "alltoall"]),
    "ep2_allgather": (2, ["--expert-parallel", 2, "--dispatcher", "allgather"]),
    "dp2": (2, []),
    "pp2": (2, ["--pipeline-parallel", 2]),
    "pp2_ep2": (4, ["--pipeline-parallel", 2, "--expert-parallel", 2]),
}


def smoke_route_env(ctx: dict, what: str) -> dict:
    """The environment of the route nccl_smoke found working (gloo in the dry mode)."""
    smoke = ctx["results"].get("nccl_smoke") or {}
    if not ctx["dry"] and "route_env" not in smoke:
        raise RuntimeError(f"nccl_smoke found no working route: nothing to launch {what} with")
    return lib.base_env(dict(ctx, route_env=smoke.get("route_env", ROUTES["gloo"])))


def phase_nccl_layouts(ctx: dict) -> dict:
    env = smoke_route_env(ctx, "the layouts")
    work = Path(ctx["workdir"]) / "layouts"
    work.mkdir(parents=True, exist_ok=True)
    ckpt = _tiny_fp8_checkpoint(work)
    demos = lib.write_demo_files(work, per_domain=3, lengths=[37, 90, 64, 120], vocab=512)
    deadline = time.monotonic() + ctx["timeout_s"] - 5

    def score(name, nproc, args):
        cmd = lib.torchrun(nproc) + [lib.REPO / "launch/score.py", "--hf-checkpoint", ckpt, "--output",
                                      work / name, "--dtype", "float32", "--telemetry-interval", "1", "--overwrite"]
        for spec in demos:
            cmd += ["--demos", spec]
        return name, lib.run_cmd(cmd + args, timeout=deadline - time.monotonic(), env=env, log=work / f"{name}.log")

    def evaluate(name, nproc, args):
        cmd = lib.torchrun(nproc) + [lib.REPO / "launch/evaluate.py", "--hf-checkpoint", ckpt, "--dtype", "float32",
                                      "--dump-logits", work / f"{name}.safetensors", "--json", work / f"{name}.json"]
        for spec in demos:
            cmd += ["--demos", spec]
        return name, lib.run_cmd(cmd + args, timeout=deadline - time.monotonic(), env=env, log=work / f"{name}.log")

    jobs = [(score, "ref_1rank", 1, [])] + [(score, n, p, a) for n, (p, a) in LAYOUTS.items()]
    jobs += [(evaluate, "eval_1rank", 1, []), (evaluate, "eval_pp2", 2, ["--pipeline-parallel", 2])]
    with concurrent.futures.ThreadPoolExecutor(max_workers=ctx["parallel_launches"]) as pool:
        runs = dict(pool.map(lambda job: job[0](*job[1:]), jobs))
    result = {"checkpoint": "tiny preset, FP8 32x16 blocks, fp32 compute", "rtol": RTOL, "runs": runs,
              "layouts": {}, "checks": [], "score_dirs": [str(work / n) for n in ["ref_1rank", *LAYOUTS]]}
    failed = {n: lib.failure_text(r) for n, r in runs.items() if r["rc"] != 0}
    result["errors"] = failed
    for name in LAYOUTS:
        if name in failed or "ref_1rank" in failed:
            lib.check(result["checks"], name, False, failed.get(name) or failed.get("ref_1rank"))
            continue
        cmp = lib.compare_scores(work / name, work / "ref_1rank", RTOL)
        result["layouts"][name] = cmp
        lib.check(result["checks"], name, cmp["ok"],
                  f"worst rel err {cmp['worst_rel_err']:.2e}, frequency exact {cmp['frequency_exact']}, "
                  f"tokens equal {cmp['tokens_equal']}")
    if "eval_1rank" in failed or "eval_pp2" in failed:
        lib.check(result["checks"], "evaluate_pp2", False, failed.get("eval_pp2") or failed.get("eval_1rank"))
    else:
        result["evaluate_pp2"] = ev = _compare_eval(work / "eval_pp2", work / "eval_1rank")
        lib.check(result["checks"], "evaluate_pp2", ev["ok"],
                  f"logits rel err {ev['logits_rel_err']:.2e}, nll rel err {ev['nll_rel_err']:.2e}")
    return result


def _compare_eval(got: Path, ref: Path) -> dict:
    from safetensors.torch import load_file

    a, b = load_file(f"{got}.safetensors"), load_file(f"{ref}.safetensors")
    errs = [lib.rel_err(a[k], b[k]) for k in b if k in a]
    ja, jb = json.loads(Path(f"{got}.json").read_text()), json.loads(Path(f"{ref}.json").read_text())
    nll = [abs(ja["results"][d]["nll"] - r["nll"]) / abs(r["nll"]) for d, r in jb["results"].items()]
    out = {"demos": len(b), "logits_rel_err": max(errs, default=float("inf")), "nll_rel_err": max(nll)}
    out["ok"] = sorted(a) == sorted(b) and out["logits_rel_err"] <= RTOL and out["nll_rel_err"] <= RTOL
    return out


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "smoke":
        smoke_worker(Path(sys.argv[2]))
    else:
        sys.exit(__doc__)
