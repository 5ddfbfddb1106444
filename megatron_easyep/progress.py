"""One progress line for long runs: done of total, rate, elapsed and ETA.

A live line (redrawn with a carriage return) on a terminal, plain periodic lines otherwise, so a
SLURM log gets a readable history instead of control characters. Only the caller decides who
shows it (rank 0 in a distributed run); `enabled=False` makes every call a no-op.
"""

from __future__ import annotations

import sys
import time

_BYTE_UNITS = (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))


def format_duration(seconds: float) -> str:
    """h:mm:ss, or m:ss under an hour."""
    seconds = max(int(round(seconds)), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_amount(value: float, unit: str) -> str:
    """Bytes in binary units; anything else as a whole number."""
    if unit == "bytes":
        for name, size in _BYTE_UNITS:
            if value >= size:
                return f"{value / size:.2f} {name}"
        return f"{value:.0f} B"
    return f"{value:.0f}"


class Progress:
    """Progress of one job of known size.

    `start` is work already done before this process (a resumed run): it counts toward the
    fraction done but not toward the rate, so the ETA is not flattered by the resume.
    """

    def __init__(self, label: str, total: float, unit: str = "tokens", *, start: float = 0,
                 enabled: bool = True, stream=None, interval: float | None = None):
        self.label, self.total, self.unit = label, float(total), unit
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        # a terminal can take frequent redraws; a log file should get a line every half minute
        self.interval = interval if interval is not None else (0.5 if self.live else 30.0)
        self.done = float(start)
        self._start_done = float(start)
        self._t0 = time.monotonic()
        self._last_shown = None

    def advance(self, amount: float) -> None:
        self.update(self.done + amount)

    def update(self, done: float) -> None:
        self.done = float(done)
        now = time.monotonic()
        if self._last_shown is None or now - self._last_shown >= self.interval:
            self._show(now, final=False)

    def close(self) -> None:
        """The last line (always shown), ending the live line with a newline."""
        self._show(time.monotonic(), final=True)

    def line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        elapsed = now - self._t0
        rate = (self.done - self._start_done) / elapsed if elapsed > 0 else 0.0
        parts = [self.label, f"{format_amount(self.done, self.unit)}/{format_amount(self.total, self.unit)}"
                 + ("" if self.unit == "bytes" else f" {self.unit}")]
        if self.total > 0:
            parts.append(f"{100 * min(self.done / self.total, 1):.0f}%")
        rate_text = format_amount(rate, self.unit) + ("/s" if self.unit == "bytes" else f" {self.unit}/s")
        parts += [rate_text, f"elapsed {format_duration(elapsed)}"]
        remaining = self.total - self.done
        if remaining <= 0:
            parts.append("done")
        elif rate > 0:
            parts.append(f"ETA {format_duration(remaining / rate)}")
        else:
            parts.append("ETA --")
        return "  ".join(parts)

    def _show(self, now: float, final: bool) -> None:
        if not self.enabled:
            return
        self._last_shown = now
        text = self.line(now)
        if self.live:
            end = "\n" if final else ""
            self.stream.write("\r\x1b[2K" + text + end)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
