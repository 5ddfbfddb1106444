"""The whole GPU check as one command (bench/gpu_check.sh calls this): every phase in its own
process under its own timeout, the whole run inside one budget (7 minutes by default), one JSON
written after every phase. A failure is recorded verbatim (traceback or the failing command's
output), a phase that does not apply is recorded as skipped with the reason; nothing is left out
silently.

    python bench/gpu_check_run.py --out FILE [--dry] [--budget-s 420] [--v3-moe-layers N]
        [--v3-demos K] [--v3-tokens T] [--nccl-route multi-rank|hostid] [--keep-workdir DIR]

Phases, in order (v3_generate runs in the background from the start, beside the NCCL phases):
  nccl_smoke, nccl_layouts   bench/gpu_check_nccl.py  several NCCL ranks on one GPU
  nccl_dead_rank             bench/gpu_check_faults.py SIGKILL to one of 2 NCCL ranks; --resume bitwise
  v3_generate, v3            bench/gpu_check_v3.py    DeepSeek-V3 widths, 256 experts, end to end
  nvml_slurm                 bench/gpu_check_ops.py   NVML telemetry in scores.json; launch_score.sh --dry-run
  kernels                    bench/gpu_check.py       the single-process FP8 kernel checks (a, d, e)
  fused_moe                  bench/fused_moe_bench.py --out FILE, when that file exists
--dry runs every phase on the CPU with gloo and tiny widths (the same code and JSON shape; CI);
phases that need CUDA (kernels, fused_moe) are recorded as skipped there.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check_lib as lib  # noqa: E402

FORMAT = "megatron-easyep-gpu-check/1"


@dataclass(frozen=True)
class Phase:
    name: str
    module: str
    function: str
    timeout_s: float   # its own limit
    reserve_s: float   # what it is guaranteed when earlier phases run long
    needs_cuda: bool = False


PHASES = [
    Phase("v3_generate", "gpu_check_v3", "phase_v3_generate", 240, 0),  # background, see main()
    Phase("nccl_smoke", "gpu_check_nccl", "phase_nccl_smoke", 60, 25),
    Phase("nccl_layouts", "gpu_check_nccl", "phase_nccl_layouts", 130, 40),
    Phase("nccl_dead_rank", "gpu_check_faults", "phase_nccl_dead_rank", 75, 20),
    Phase("v3", "gpu_check_v3", "phase_v3", 200, 60),
    Phase("nvml_slurm", "gpu_check_ops", "phase_nvml_slurm", 30, 10),
    Phase("kernels", "gpu_check_ops", "phase_kernels", 45, 15, needs_cuda=True),
    Phase("fused_moe", "gpu_check_ops", "phase_fused_moe", 60, 15, needs_cuda=True),
]
BACKGROUND = "v3_generate"
PREREQUISITES = {"nccl_layouts": "nccl_smoke", "nccl_dead_rank": "nccl_smoke", "v3": BACKGROUND}


# ------------------------------------------------------------------------------------------------
# one phase, in its own process
# ------------------------------------------------------------------------------------------------

def run_phase_in_process(name: str, context: Path, result: Path) -> int:
    """Entry of a phase's process: call its function, write what it returns."""
    phase = next(p for p in PHASES if p.name == name)
    ctx = json.loads(context.read_text())
    try:
        out = getattr(importlib.import_module(phase.module), phase.function)(ctx)
    except Exception:  # noqa: BLE001 - recorded verbatim by the parent
        traceback.print_exc()
        return 1
    lib.write_json(result, out)
    return 0


def _start(phase: Phase, ctx: dict, workdir: Path, timeout: float) -> tuple[subprocess.Popen, Path, float]:
    context, result = workdir / f"{phase.name}.context.json", workdir / f"{phase.name}.result.json"
    lib.write_json(context, dict(ctx, timeout_s=timeout, result_path=str(result)))
    result.unlink(missing_ok=True)
    with open(workdir / f"{phase.name}.phase.log", "w") as log:  # the child keeps its own handle
        proc = subprocess.Popen([sys.executable, __file__, "--run-phase", phase.name, "--context", str(context),
                                 "--result", str(result)], cwd=lib.REPO, env=lib.base_env(ctx), stdout=log,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    started = time.monotonic()
    # the moment it exits (a background phase is collected later)
    threading.Thread(target=lambda: (proc.wait(), setattr(proc, "ended", time.monotonic())), daemon=True).start()
    return proc, result, started


def _finish(phase: Phase, proc: subprocess.Popen, result: Path, started: float, timeout: float,
            workdir: Path) -> dict:
    """Wait (up to what is left of `timeout`), then the phase's entry for the JSON."""
    timed_out = False
    try:
        proc.wait(timeout=max(1.0, started + timeout - time.monotonic()))
    except subprocess.TimeoutExpired:
        timed_out = True
        lib._kill_group(proc)
        proc.wait()
    log = (workdir / f"{phase.name}.phase.log").read_text(errors="replace")
    entry = {"seconds": round(getattr(proc, "ended", time.monotonic()) - started, 2), "timeout_s": round(timeout, 1)}
    partial = json.loads(result.read_text()) if result.exists() else None  # lib.save_partial's, if any
    if timed_out:
        return entry | {"status": "timeout", "error": f"killed after {timeout:.0f} s\n{log[-lib.TAIL:]}",
                        "partial_result": partial}
    if proc.returncode != 0 or partial is None:
        return entry | {"status": "failed", "error": f"exit {proc.returncode}\n{log[-lib.TAIL:]}",
                        "partial_result": partial}
    out = partial
    out.pop("partial", None)
    failed = [c for c in out.get("checks", []) if not c["ok"]]
    entry.update(status="failed" if failed else "ok", result=out)
    if failed:
        entry["error"] = "\n".join(f"{c['name']}: {c['detail']}" for c in failed)
    return entry


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------

def _skip_reason(phase: Phase, ctx: dict) -> str | None:
    if ctx["phases"] and phase.name not in ctx["phases"]:
        return f"not selected (--phases {','.join(ctx['phases'])})"
    if phase.needs_cuda and ctx["dry"]:
        return "needs CUDA: the dry mode (CPU, gloo) checks the other phases' code paths only"
    if phase.name == "fused_moe" and not (lib.REPO / "bench" / "fused_moe_bench.py").exists():
        return "bench/fused_moe_bench.py does not exist in this checkout"
    return None


def _environment(dry: bool) -> dict:
    import platform

    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "host": platform.node(),
           "cuda_available": torch.cuda.is_available(), "cpus": __import__("os").cpu_count()}
    try:
        import megatron.core

        env["megatron_core"] = getattr(megatron.core, "__version__", "unknown")
    except Exception as exc:  # noqa: BLE001
        env["megatron_core"] = f"not importable: {exc}"
    if torch.cuda.is_available():
        env.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(),
                   gpu_memory_gib=torch.cuda.get_device_properties(0).total_memory / 2 ** 30)
        try:
            env["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            env["nvidia_smi"] = f"failed: {exc}"
    return env


def _timeout_for(i: int, phase: Phase, deadline: float) -> float:
    """Its own limit, cut so that every later phase still gets its reserve inside the budget."""
    later = sum(p.reserve_s for p in PHASES[i + 1:] if p.name != BACKGROUND)
    return min(phase.timeout_s, deadline - time.monotonic() - later)


def run_all(args) -> dict:
    global PHASES
    # the dry mode runs on a 2-core CI machine, maybe beside other work: every limit scaled alike
    scale = args.time_scale or (3.0 if args.dry else 1.0)
    PHASES = [dataclasses.replace(p, timeout_s=p.timeout_s * scale, reserve_s=p.reserve_s * scale) for p in PHASES]
    budget_s = args.budget_s * scale
    t0 = time.monotonic()
    deadline = t0 + budget_s
    workdir = Path(args.keep_workdir or tempfile.mkdtemp(prefix="easyep-gpu-check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    report = {"format": FORMAT, "mode": "dry" if args.dry else "gpu",
              "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "budget_s": budget_s,
              "command": " ".join(sys.argv), "environment": _environment(args.dry), "phases": {}}
    ctx = {"dry": args.dry, "workdir": str(workdir), "results": {}, "nccl_route": args.nccl_route,
           "parallel_launches": args.parallel_launches or (1 if args.dry else 4),
           "v3_moe_layers": args.v3_moe_layers, "v3_demos": args.v3_demos, "v3_tokens": args.v3_tokens,
           "v3_keep": args.v3_keep, "v3_experts": args.v3_experts,
           "v3_timeout_s": next(p.timeout_s for p in PHASES if p.name == "v3"),
           "kernel_parts": args.kernel_parts, "phases": args.phases.split(",") if args.phases else []}
    unknown = set(ctx["phases"]) - {p.name for p in PHASES}
    if unknown:
        raise SystemExit(f"--phases: unknown phase(s) {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(p.name for p in PHASES)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    background = None
    try:
        for i, phase in enumerate(PHASES):
            if phase.name == BACKGROUND and not _skip_reason(phase, ctx):
                timeout = min(phase.timeout_s, deadline - time.monotonic() - 60)
                background = (phase, *_start(phase, ctx, workdir, timeout), timeout)
                print(f"[gpu-check] {phase.name}: started in the background (timeout {timeout:.0f} s)", flush=True)
                continue
            if phase.name == BACKGROUND:
                report["phases"][phase.name] = entry = _run_one(i, phase, ctx, workdir, deadline, report)
                _print(phase.name, entry)
                continue
            if background is not None and phase.name == "v3":
                report["phases"][BACKGROUND] = entry = _finish(background[0], *background[1:4], background[4], workdir)
                ctx["results"][BACKGROUND] = entry.get("result")
                _print(BACKGROUND, entry)
                background = None
            entry = _run_one(i, phase, ctx, workdir, deadline, report)
            report["phases"][phase.name] = entry
            ctx["results"][phase.name] = entry.get("result")
            _print(phase.name, entry)
            report["total_seconds"] = round(time.monotonic() - t0, 1)
            lib.write_json(out, report)
    finally:
        if background is not None:  # stopped early: do not leave the generator running
            lib._kill_group(background[1])
        report["total_seconds"] = round(time.monotonic() - t0, 1)
        report["summary"] = {s: [n for n, e in report["phases"].items() if e["status"] == s]
                             for s in ("ok", "failed", "timeout", "skipped", "not_run")}
        lib.write_json(out, report)
        if args.logs:
            _archive_logs(workdir, Path(args.logs))
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return report


def _run_one(i: int, phase: Phase, ctx: dict, workdir: Path, deadline: float, report: dict) -> dict:
    reason = _skip_reason(phase, ctx)
    if reason:
        return {"status": "skipped", "reason": reason, "seconds": 0}
    needed = PREREQUISITES.get(phase.name)
    if needed and report["phases"].get(needed, {}).get("result") is None:  # a failed check still has one
        return {"status": "not_run", "seconds": 0,
                "reason": f"{needed} gave no result ({report['phases'].get(needed, {}).get('status')})"}
    timeout = _timeout_for(i, phase, deadline)
    if timeout < 5:
        return {"status": "not_run", "reason": f"the {report['budget_s']} s budget is spent", "seconds": 0}
    print(f"[gpu-check] {phase.name}: running (timeout {timeout:.0f} s)", flush=True)
    return _finish(phase, *_start(phase, ctx, workdir, timeout), timeout, workdir)


def _print(name: str, entry: dict) -> None:
    line = f"[gpu-check] {name}: {entry['status']} ({entry.get('seconds', 0)} s)"
    if entry.get("error") or entry.get("reason"):
        line += "\n    " + (entry.get("error") or entry.get("reason"))[-1500:].replace("\n", "\n    ")
    print(line, flush=True)


def _archive_logs(workdir: Path, path: Path) -> None:
    """Every *.log of the run (small text) in one archive: the per-launch output behind each entry."""
    with tarfile.open(path, "w:gz") as tar:
        for log in sorted(workdir.rglob("*.log")):
            if log.stat().st_size < 8 << 20:
                tar.add(log, arcname=str(log.relative_to(workdir)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="the JSON file to write")
    p.add_argument("--dry", action="store_true", help="CPU, gloo, tiny widths (CI)")
    p.add_argument("--budget-s", type=float, default=420.0, help="the whole run, seconds (default 7 minutes)")
    p.add_argument("--time-scale", type=float,
                   help="multiply the budget and every phase's limit (default 1 on a GPU, 3 with --dry)")
    p.add_argument("--logs", help="also write every launch's log into this .tar.gz")
    p.add_argument("--keep-workdir", help="work here and keep it (default: a temporary directory, removed)")
    p.add_argument("--nccl-route", choices=["multi-rank", "hostid"], help="default: from torch.cuda.nccl.version()")
    p.add_argument("--parallel-launches", type=int, help="layout launches at a time (default 4 on a GPU, 1 dry)")
    p.add_argument("--v3-moe-layers", type=int, help="N (default: the largest that fits memory, disk and time)")
    p.add_argument("--v3-demos", type=int, help="demonstrations (default 4)")
    p.add_argument("--v3-tokens", type=int, help="tokens per demonstration (default 16384; dry 64)")
    p.add_argument("--v3-keep", type=int, help="experts kept per layer in the export (default E/2)")
    p.add_argument("--v3-experts", type=int, help="routed experts (default 256)")
    p.add_argument("--phases", help="run only these (comma-separated); the others are recorded as skipped")
    p.add_argument("--kernel-parts", default="a,d,e", help="bench/gpu_check.py parts (default a,d,e, --quick)")
    p.add_argument("--run-phase", help=argparse.SUPPRESS)
    p.add_argument("--context", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run_phase:
        return run_phase_in_process(args.run_phase, Path(args.context), Path(args.result))
    if not args.out:
        p.error("--out is required")
    report = run_all(args)
    print(f"[gpu-check] {report['total_seconds']} s; "
          + ", ".join(f"{k}: {' '.join(v) or '-'}" for k, v in report["summary"].items()) + f"; wrote {args.out}")
    return 0 if not (report["summary"]["failed"] or report["summary"]["timeout"]) else 1


if __name__ == "__main__":
    sys.exit(main())
