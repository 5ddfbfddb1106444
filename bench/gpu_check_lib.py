"""Shared pieces of the GPU check (bench/gpu_check_run.py and its phase modules): running a
command under a hard timeout with its output kept, checks that record instead of raising, atomic
JSON, and the score / logits comparisons."""

from __future__ import annotations

import json
import random
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TAIL = 8000  # characters of stdout / stderr kept for a failed command, verbatim


def write_json(path: Path, data) -> None:
    """Atomic: a temporary sibling, then a rename (a killed run never leaves half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def save_partial(ctx: dict, result: dict) -> None:
    """A long phase's progress so far: kept in the JSON if the phase is killed at its timeout."""
    if ctx.get("result_path"):
        write_json(Path(ctx["result_path"]), dict(result, partial=True))


def base_env(ctx: dict, extra: dict | None = None) -> dict:
    """The environment every launched process gets: this checkout first on the path, the NCCL
    route's variables, one OpenMP thread per rank on the 2-core CI machine."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    if ctx.get("dry"):
        env.setdefault("OMP_NUM_THREADS", "1")
    env.update(ctx.get("route_env") or {})
    env.update(extra or {})
    return env


def run_cmd(cmd: list[str], *, timeout: float, env: dict | None = None, log: Path | None = None) -> dict:
    """Run `cmd` in its own process group; past `timeout` seconds the whole group is killed (torchrun
    and its workers). Returns rc, seconds, timed_out and, when it failed, the output tails."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    timed_out = False
    try:
        out, err = proc.communicate(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
        out, err = proc.communicate()
    result = {"cmd": " ".join(str(c) for c in cmd), "rc": proc.returncode,
              "seconds": round(time.perf_counter() - t0, 3), "timed_out": timed_out}
    if log is not None:
        Path(log).write_text(f"$ {result['cmd']}\n--- stdout\n{out}\n--- stderr\n{err}\n")
    if proc.returncode != 0 or timed_out:
        result["stdout_tail"] = out[-TAIL:]
        result["stderr_tail"] = err[-TAIL:]
    return result


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def failure_text(result: dict) -> str:
    what = f"timed out after {result['seconds']} s" if result["timed_out"] else f"exit {result['rc']}"
    return f"{result['cmd']}: {what}\n{result.get('stderr_tail', '')}\n{result.get('stdout_tail', '')}".strip()


def check(checks: list, name: str, ok: bool, detail="") -> bool:
    """Record one pass/fail line (the phase's status is failed when any is False)."""
    checks.append({"name": name, "ok": bool(ok), "detail": detail})
    return bool(ok)


def python() -> str:
    return sys.executable


def torchrun(nproc: int) -> list[str]:
    """Several ranks via torchrun; one rank as a plain process (a world of one)."""
    if nproc <= 1:
        return [python()]
    return [python(), "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "--max-restarts=0"]


def rel_err(a, b) -> float:
    """max |a - b| / max |b| (0 when both are zero)."""
    scale = float(b.abs().max()) if b.numel() else 0.0
    diff = float((a.double() - b.double()).abs().max()) if b.numel() else 0.0
    return diff / scale if scale > 0 else diff


def compare_scores(got_dir: Path, ref_dir: Path, rtol: float) -> dict:
    """Every tensor of two score files: frequency* must be equal, the rest within `rtol` (relative
    to the reference's largest magnitude); token counts equal."""
    from safetensors.torch import load_file

    got, ref = load_file(str(Path(got_dir) / "scores.safetensors")), load_file(str(Path(ref_dir) / "scores.safetensors"))
    out = {"keys_equal": sorted(got) == sorted(ref), "max_rel_err": {}, "frequency_exact": True, "ok": True}
    for key in sorted(ref):
        if key not in got:
            out["ok"] = False
            continue
        if key.startswith("frequency"):
            exact = bool((got[key] == ref[key]).all())
            out["frequency_exact"] &= exact
            out["ok"] &= exact
        else:
            err = rel_err(got[key], ref[key])
            out["max_rel_err"][key] = err
            out["ok"] &= err <= rtol
    info_got = json.loads((Path(got_dir) / "scores.json").read_text())
    info_ref = json.loads((Path(ref_dir) / "scores.json").read_text())
    out["tokens_equal"] = info_got["tokens"] == info_ref["tokens"]
    out["ok"] = bool(out["ok"] and out["keys_equal"] and out["tokens_equal"])
    out["worst_rel_err"] = max(out["max_rel_err"].values(), default=0.0)
    return out


def topm_overlap(a, b, m: int) -> list[float]:
    """Per layer: |top-m(a) & top-m(b)| / m of two [layers, experts] score tensors."""
    return [len(set(a[r].topk(m).indices.tolist()) & set(b[r].topk(m).indices.tolist())) / m
            for r in range(a.shape[0])]


def write_demo_files(workdir: Path, *, per_domain: int, lengths, vocab: int, seed: int = 0) -> list[str]:
    """Random token-id demonstrations in two domains (FILE:DOMAIN specs); lengths cycle through
    `lengths` so EP ranks get uneven token counts."""
    rng = random.Random(seed)
    specs = []
    for d, domain in enumerate(("math", "code")):
        path = workdir / f"demos_{domain}.jsonl"
        rows = [{"input_ids": [rng.randrange(vocab) for _ in range(lengths[(i + d) % len(lengths)])]}
                for i in range(per_domain)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        specs.append(f"{path}:{domain}")
    return specs
