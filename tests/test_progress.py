"""The progress line: fraction, rate and ETA against hand-computed values, live vs plain output."""

import io

from megatron_easyep import progress as progress_lib
from megatron_easyep.progress import Progress, format_amount, format_duration


def test_durations_and_amounts_are_formatted_by_hand_rules():
    assert format_duration(0) == "0:00"
    assert format_duration(59.6) == "1:00"
    assert format_duration(3725) == "1:02:05"
    assert format_amount(3 * (1 << 30) + (1 << 29), "bytes") == "3.50 GiB"
    assert format_amount(512, "bytes") == "512 B"
    assert format_amount(1280.4, "tokens") == "1280"


def test_rate_and_eta_exclude_work_done_before_a_resume(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(progress_lib.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    bar = Progress("score", total=10_000, unit="tokens", start=2_000, stream=out, interval=0)
    clock[0] = 110.0
    bar.update(4_000)  # 2000 tokens in 10 s -> 200 tokens/s; 6000 left -> 30 s
    assert out.getvalue() == "score  4000/10000 tokens  40%  200 tokens/s  elapsed 0:10  ETA 0:30\n"
    clock[0] = 140.0
    bar.update(10_000)
    bar.close()
    assert out.getvalue().splitlines()[-1].endswith("elapsed 0:40  done")


def test_plain_lines_are_throttled_and_live_lines_redraw(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(progress_lib.time, "monotonic", lambda: clock[0])
    plain = io.StringIO()
    bar = Progress("export", total=1 << 30, unit="bytes", stream=plain, interval=30)
    for second in range(1, 61):
        clock[0] = float(second)
        bar.advance(1 << 24)
    # shown at t=1, 31 (throttled to one per 30 s), plus the closing line
    bar.close()
    assert len(plain.getvalue().splitlines()) == 3
    assert "MiB/s" in plain.getvalue()

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    live = Progress("eval", total=4, unit="demos", stream=tty, interval=0)
    live.advance(1)
    live.close()
    assert tty.getvalue().startswith("\r\x1b[2K") and tty.getvalue().count("\n") == 1


def test_disabled_progress_writes_nothing():
    out = io.StringIO()
    bar = Progress("score", total=10, stream=out, enabled=False)
    bar.advance(5)
    bar.close()
    assert out.getvalue() == ""
