"""GPU telemetry (megatron_easyep.scoring.telemetry): the silent no-op without NVML/GPUs (this machine), the
sampler's thread and summary with a scripted sample source, and the cross-rank gather over gloo.

The NVML source itself needs a GPU; on a GPU node run
    python -c "from megatron_easyep.scoring.telemetry import GpuTelemetry; import torch, time; \
torch.cuda.init(); t = GpuTelemetry(0.2).start(); time.sleep(1); t.stop(); print(t.summary())"
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from megatron_easyep.scoring import telemetry
from megatron_easyep.scoring.telemetry import MIB, GpuTelemetry

HAVE_PYNVML = importlib.util.find_spec("pynvml") is not None


# --------------------------------------------------------------------------------------------
# 1. no GPU: silently nothing
# --------------------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="this test is about machines without GPUs")
def test_without_gpus_it_is_a_silent_no_op(capfd):
    threads_before = threading.active_count()
    with GpuTelemetry(interval_s=0.01) as t:
        time.sleep(0.05)
    assert not t.enabled
    assert t.summary() is None
    assert t.samples == []
    assert t.reason  # says why, for whoever asks
    expected = "no CUDA GPU is visible" if HAVE_PYNVML else "nvidia-ml-py (pynvml) is not installed"
    assert t.reason == expected
    assert threading.active_count() == threads_before  # no sampler thread was started
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert telemetry.gather_summaries(t.summary()) is None
    assert telemetry.format_summary(None) == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="this test is about machines without GPUs")
def test_no_op_without_pynvml_importable(tmp_path):
    """Whatever this environment has installed: with pynvml made unimportable, still silent."""
    code = ("import sys; sys.modules['pynvml'] = None\n"
            "from megatron_easyep.scoring.telemetry import GpuTelemetry\n"
            "t = GpuTelemetry(0.01).start(); t.stop()\n"
            "assert t.summary() is None and not t.enabled, t.reason\n"
            "assert t.reason == 'nvidia-ml-py (pynvml) is not installed', t.reason\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert "telemetry" not in proc.stderr.lower()


# --------------------------------------------------------------------------------------------
# 2. the sampler with a scripted source (a stand-in for NVML, not for the code under test)
# --------------------------------------------------------------------------------------------

class ScriptedSource:
    """Returns memory 1000, 2000, 3000, ... MiB and utilisation 10, 20, 30, ... %; raises after
    `fail_after` samples if given."""

    def __init__(self, fail_after: int | None = None):
        self.calls = 0
        self.fail_after = fail_after
        self.closed = False

    def sample(self):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("GPU is lost")
        self.calls += 1
        return self.calls * 1000 * MIB, float(10 * self.calls % 100)

    def describe(self):
        return {"device_name": "Scripted GPU", "memory_total_mib": 81559.0}

    def close(self):
        self.closed = True


def test_sampler_thread_and_summary_with_a_scripted_source():
    source = ScriptedSource()
    t = GpuTelemetry(interval_s=0.02, source=source)
    assert t.enabled
    with t:
        assert len(t.samples) == 1  # sampled once at start
        time.sleep(0.3)
    samples = t.samples
    n = len(samples)
    # ~15 interval samples + start + end; a loaded CI machine may run late, never early
    assert 4 <= n <= 0.3 / 0.02 + 3, n
    assert n == source.calls and source.closed
    assert [s.memory_used_bytes for s in samples] == [k * 1000 * MIB for k in range(1, n + 1)]
    assert all(b.t >= a.t for a, b in zip(samples, samples[1:]))
    summary = t.summary()
    # memory 1000..n*1000 MiB: peak n*1000, mean (n+1)*500; util 10*k % 100
    utils = [10 * k % 100 for k in range(1, n + 1)]
    assert summary["samples"] == n
    assert summary["peak_memory_mib"] == n * 1000
    assert summary["mean_memory_mib"] == pytest.approx((n + 1) * 500, abs=0.05)
    assert summary["mean_utilization_pct"] == pytest.approx(sum(utils) / n, abs=0.05)
    assert summary["max_utilization_pct"] == max(utils)
    assert summary["interval_s"] == 0.02
    assert 0.25 <= summary["duration_s"] < 5
    assert summary["device_name"] == "Scripted GPU"
    assert "sampling_error" not in summary
    # after stop nothing samples any more
    time.sleep(0.1)
    assert source.calls == n
    t.stop()  # idempotent


def test_a_failing_source_ends_sampling_and_keeps_what_it_had():
    source = ScriptedSource(fail_after=3)
    with GpuTelemetry(interval_s=0.01, source=source) as t:
        time.sleep(0.2)
    summary = t.summary()
    assert summary["samples"] == 3
    assert summary["peak_memory_mib"] == 3000 and summary["mean_memory_mib"] == 2000
    assert summary["sampling_error"] == "RuntimeError: GPU is lost"


def test_interval_must_be_positive():
    with pytest.raises(ValueError, match="interval"):
        GpuTelemetry(interval_s=0)


def test_format_summary_lines():
    line = telemetry.format_summary([None, {"rank": 1, "device_name": "H800", "peak_memory_mib": 70000.0,
                                            "mean_memory_mib": 65000.4, "mean_utilization_pct": 88.2,
                                            "max_utilization_pct": 100.0, "samples": 12}])
    assert line == ("gpu telemetry rank 1: H800 peak 70000 MiB, mean 65000 MiB, "
                    "util mean 88% max 100% (12 samples)")


# --------------------------------------------------------------------------------------------
# 3. gathering every rank's summary (real torch.distributed, gloo, 2 processes)
# --------------------------------------------------------------------------------------------

GATHER_WORKER = """
import os, sys, torch, torch.distributed as dist
from megatron_easyep.scoring import telemetry
rank = int(os.environ["RANK"])
dist.init_process_group("gloo")
summary = None if rank == 0 else {"peak_memory_mib": 100.0 * rank}
result = {"gathered": telemetry.gather_summaries(summary), "none": telemetry.gather_summaries(None)}
torch.save(result, os.path.join(sys.argv[1], f"{rank}.pt"))
dist.destroy_process_group()
"""


def test_gather_summaries_across_ranks(tmp_path):
    assert telemetry.gather_summaries({"peak_memory_mib": 1.0}) == [{"peak_memory_mib": 1.0, "rank": 0}]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", GATHER_WORKER, str(tmp_path)],
                              env={**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                   "RANK": str(rank), "WORLD_SIZE": "2"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
    for rank in range(2):
        result = torch.load(tmp_path / f"{rank}.pt")
        assert result["gathered"] == [None, {"peak_memory_mib": 100.0, "rank": 1}]
        assert result["none"] is None
