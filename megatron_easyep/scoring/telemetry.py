"""Per-rank GPU telemetry during scoring: memory used and utilisation, sampled by NVML.

    with GpuTelemetry(interval_s=5) as telemetry:
        ... scoring ...
    summary = telemetry.summary()   # dict for scores.json, or None
    per_rank = gather_summaries(summary)  # every rank calls it; list on every rank

Needs nvidia-ml-py (``import pynvml``) and a visible NVIDIA GPU. Without either (CPU CI, no driver,
NVML refusing to start) it is a no-op: nothing is started, nothing is printed, ``summary()`` is
None and ``reason`` says why. A failure while sampling ends the sampling quietly; what was
sampled until then is still summarised.

The device sampled is this process's CUDA device (torch.cuda.current_device(), mapped to the NVML
device by PCI bus id, so CUDA_VISIBLE_DEVICES is respected). NVML's "memory used" is the whole
device's (every process on it, plus the CUDA context), which is what decides whether a layout fits;
the summary adds torch's own peak allocation for this process next to it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

MIB = 1024 * 1024


@dataclass(frozen=True)
class Sample:
    t: float  # seconds since start
    memory_used_bytes: int
    utilization_pct: float


class NvmlSource:
    """Reads one GPU through NVML. ``open()`` returns None (with a reason) when that is impossible."""

    def __init__(self, pynvml, handle, index: int, name: str, memory_total_bytes: int):
        self._nvml = pynvml
        self._handle = handle
        self.index = index
        self.name = name
        self.memory_total_bytes = memory_total_bytes

    @classmethod
    def open(cls, cuda_device: int | None = None) -> tuple["NvmlSource | None", str]:
        try:
            import pynvml
        except Exception:
            return None, "nvidia-ml-py (pynvml) is not installed"
        try:
            import torch

            if not torch.cuda.is_available():
                return None, "no CUDA GPU is visible"
            device = torch.cuda.current_device() if cuda_device is None else cuda_device
            pynvml.nvmlInit()
        except Exception as exc:  # NVMLError_LibraryNotFound / DriverNotLoaded / ...
            return None, f"NVML unavailable: {exc}"
        try:
            handle = _nvml_handle(pynvml, device)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else str(name)
            total = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
            index = int(pynvml.nvmlDeviceGetIndex(handle))
            return cls(pynvml, handle, index, name, total), ""
        except Exception as exc:
            _shutdown(pynvml)
            return None, f"NVML cannot read CUDA device {device}: {exc}"

    def sample(self) -> tuple[int, float]:
        memory = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
        utilization = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
        return int(memory.used), float(utilization.gpu)

    def close(self) -> None:
        _shutdown(self._nvml)

    def describe(self) -> dict:
        return {"device_name": self.name, "nvml_index": self.index,
                "memory_total_mib": round(self.memory_total_bytes / MIB, 1)}


def _shutdown(pynvml) -> None:
    try:
        pynvml.nvmlShutdown()
    except Exception:
        pass


def _nvml_handle(pynvml, cuda_device: int):
    """NVML handle of a CUDA device: by PCI bus id (NVML numbers all GPUs, ignoring
    CUDA_VISIBLE_DEVICES), else by torch's mapping of CUDA_VISIBLE_DEVICES, else by index."""
    import torch

    props = torch.cuda.get_device_properties(cuda_device)
    bus = getattr(props, "pci_bus_id", None)
    if bus is not None:
        bus_id = (f"{getattr(props, 'pci_domain_id', 0):08X}:{bus:02X}:"
                  f"{getattr(props, 'pci_device_id', 0):02X}.0")
        try:
            return pynvml.nvmlDeviceGetHandleByPciBusId(bus_id.encode())
        except Exception:
            pass
    try:  # torch's own CUDA_VISIBLE_DEVICES -> NVML index mapping (private, hence the fallback)
        return pynvml.nvmlDeviceGetHandleByIndex(torch.cuda._get_nvml_device_index(cuda_device))
    except Exception:
        return pynvml.nvmlDeviceGetHandleByIndex(cuda_device)


class GpuTelemetry:
    """Background sampler (a daemon thread) of one GPU's memory used and utilisation.

    ``source`` is anything with ``sample() -> (memory_used_bytes, utilization_pct)`` (and
    optionally ``describe()`` / ``close()``); by default NVML for this process's CUDA device, or
    nothing at all when NVML or a GPU is missing.
    """

    def __init__(self, interval_s: float = 5.0, *, source=None, cuda_device: int | None = None):
        if not interval_s > 0:
            raise ValueError(f"telemetry interval must be > 0 seconds, got {interval_s!r}")
        self.interval_s = float(interval_s)
        self._source = source
        self._cuda_device = cuda_device
        self._samples: list[Sample] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self.error: str | None = None  # why sampling ended early, if it did
        self.reason = ""  # why telemetry is off, when it is

    @property
    def enabled(self) -> bool:
        return self._source is not None

    def start(self) -> "GpuTelemetry":
        if self._thread is not None:
            return self
        if self._source is None:
            self._source, self.reason = NvmlSource.open(self._cuda_device)
            if self._source is None:
                return self
        self._t0 = time.monotonic()
        self._stop.clear()
        self._sample_once()  # at least one sample, even for a run shorter than the interval
        self._thread = threading.Thread(target=self._run, name="easyep-gpu-telemetry", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        if self.error is None:
            self._sample_once()  # the state at the end of the run
        close = getattr(self._source, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "GpuTelemetry":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if not self._sample_once():
                return

    def _sample_once(self) -> bool:
        if self.error is not None:
            return False
        try:
            used, util = self._source.sample()
        except Exception as exc:  # the GPU fell off the bus, NVML was shut down, ...
            self.error = f"{type(exc).__name__}: {exc}"
            return False
        with self._lock:
            self._samples.append(Sample(time.monotonic() - self._t0, int(used), float(util)))
        return True

    @property
    def samples(self) -> list[Sample]:
        with self._lock:
            return list(self._samples)

    def summary(self) -> dict | None:
        """{"samples", "interval_s", "duration_s", "peak_memory_mib", "mean_memory_mib",
        "mean_utilization_pct", "max_utilization_pct", ...device facts}; None when disabled or
        nothing was sampled."""
        samples = self.samples
        if not self.enabled or not samples:
            return None
        memory = [s.memory_used_bytes / MIB for s in samples]
        util = [s.utilization_pct for s in samples]
        out = {
            "samples": len(samples),
            "interval_s": self.interval_s,
            "duration_s": round(samples[-1].t - samples[0].t, 3),
            "peak_memory_mib": round(max(memory), 1),
            "mean_memory_mib": round(sum(memory) / len(memory), 1),
            "mean_utilization_pct": round(sum(util) / len(util), 1),
            "max_utilization_pct": round(max(util), 1),
        }
        describe = getattr(self._source, "describe", None)
        if describe is not None:
            out.update(describe())
        peak = _torch_peak_allocated_mib()
        if peak is not None:
            out["torch_peak_allocated_mib"] = peak
        if self.error is not None:
            out["sampling_error"] = self.error
        return out


def _torch_peak_allocated_mib() -> float | None:
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return round(torch.cuda.max_memory_allocated() / MIB, 1)
    except Exception:
        pass
    return None


def gather_summaries(summary: dict | None) -> list[dict | None] | None:
    """Every rank's summary, in rank order (call on every rank). None when no rank has one, so a
    CPU run writes nothing. Without torch.distributed initialised: [summary] or None."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, summary)
    else:
        everyone = [summary]
    if all(s is None for s in everyone):
        return None
    return [dict(s, rank=rank) if s is not None else None for rank, s in enumerate(everyone)]


def format_summary(per_rank: list[dict | None] | None) -> str:
    """One log line per rank ("" when there is nothing to say)."""
    if not per_rank:
        return ""
    lines = []
    for s in per_rank:
        if s is None:
            continue
        lines.append(f"gpu telemetry rank {s['rank']}: {s.get('device_name', 'GPU')} "
                     f"peak {s['peak_memory_mib']:.0f} MiB, mean {s['mean_memory_mib']:.0f} MiB, "
                     f"util mean {s['mean_utilization_pct']:.0f}% max {s['max_utilization_pct']:.0f}% "
                     f"({s['samples']} samples)")
    return "\n".join(lines)
