"""Shared command-line plumbing for launch/ entry points: YAML defaults + overrides, and one
place that turns bad input into a clear message and a non-zero exit."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))


def load_yaml_defaults(path: str | None, default: Path) -> dict:
    import yaml

    path = Path(path) if path else default
    if not path.is_file():
        raise SystemExit(f"error: config file {path} does not exist")
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise SystemExit(f"error: {path}: expected a mapping of option: value")
    return values


def third_party_log_path(script: str) -> Path:
    """This rank's log file for other libraries' warnings.

    EASYEP_WARNINGS_LOG_DIR, else the SLURM run's log directory (launch/slurm/launch_score.sh sets
    EASYEP_RUN_LOG_DIR), else runs/logs/<script>-<run id> under the current directory. The run id
    is torchrun's (the same on every rank of a run), or this process's id without torchrun."""
    rank = os.environ.get("RANK", "0")
    directory = os.environ.get("EASYEP_WARNINGS_LOG_DIR") or os.environ.get("EASYEP_RUN_LOG_DIR")
    if not directory:
        run_id = os.environ.get("TORCHELASTIC_RUN_ID") or f"pid{os.getpid()}"
        directory = Path("runs") / "logs" / f"{script}-{run_id[:8]}"
    return Path(directory) / f"{script}-rank{rank}.log"


def _is_ours(path: str) -> bool:
    """A warning raised from this checkout's code (not from an installed library)."""
    try:
        resolved = Path(path).resolve()
    except (OSError, ValueError):
        return False
    return resolved.is_relative_to(REPO) and "site-packages" not in resolved.parts


class _TerminalFilter(logging.Filter):
    """What still reaches the terminal: errors from anyone, and this project's own records."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or record.name.split(".")[0] == "megatron_easyep"


class _WarningsLog:
    """The per-rank warnings file, best effort: when it cannot be written (disk full, a file-size
    limit) its text goes to the terminal instead, with one line saying why, so a failing log never
    becomes the run's error."""

    def __init__(self, path: Path):
        self.path, self.file = path, None
        try:  # a read-only or full working directory (runs/logs is under it) must not stop the run
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a", buffering=1, encoding="utf-8")
        except OSError as err:
            sys.stderr.write(f"note: cannot write {path} ({err.strerror}); other libraries' warnings go to "
                             "the terminal\n")

    def write(self, text: str) -> None:
        if self.file is not None:
            try:
                self.file.write(text)
                return
            except OSError as err:
                self.file = None
                sys.stderr.write(f"note: cannot write {self.path} ({err}); other libraries' warnings "
                                 "go to the terminal\n")
        sys.stderr.write(text)

    def flush(self) -> None:
        if self.file is not None:
            try:
                self.file.flush()
            except OSError:
                self.file = None


def route_third_party_output(script: str) -> Path:
    """Send other libraries' warnings and log records to a per-rank file; keep ours on stderr.

    Megatron-Core, Transformer Engine/Apex fall-backs, absl and torch.distributed each warn once
    per rank at start-up; on N ranks that is N screens before the first progress line. Python
    warnings raised outside this checkout, and log records below ERROR from loggers outside
    megatron_easyep (torch's own handlers included), go to the file. Our warnings, every ERROR
    record and every traceback still reach the terminal. Output that C/C++ libraries write
    straight to file descriptor 2 (NCCL, gloo) is left alone: it can be the only trace of a hang.
    Rank 0 prints the file's location once. Returns the path."""
    import warnings

    path = third_party_log_path(script)
    log_file = _WarningsLog(path)
    if log_file.file is not None:
        log_file.write(f"# {script} rank {os.environ.get('RANK', '0')} pid {os.getpid()}: {' '.join(sys.argv)}\n")
    show_on_terminal = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if _is_ours(filename):
            show_on_terminal(message, category, filename, lineno, file, line)
        else:
            log_file.write(warnings.formatwarning(message, category, filename, lineno, line))

    warnings.showwarning = showwarning
    to_file = logging.StreamHandler(log_file)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    to_terminal = logging.StreamHandler(sys.stderr)
    to_terminal.addFilter(_TerminalFilter())
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(to_file)
    root.addHandler(to_terminal)
    root.setLevel(logging.WARNING)
    # torch configures its own "torch" logger (handlers of its own, no propagation): route it alike
    import torch  # noqa: F401  (every launch needs it; importing it here sets up its loggers first)

    torch_logger = logging.getLogger("torch")
    for handler in list(torch_logger.handlers):
        handler.addFilter(_TerminalFilter())
    torch_logger.addHandler(to_file)
    if os.environ.get("RANK", "0") == "0" and log_file.file is not None:
        pattern = path.with_name(path.name.replace("-rank0.log", "-rank*.log"))
        print(f"other libraries' warnings: {pattern}", file=sys.stderr, flush=True)
    return path


def run_main(main, quiet: str | None = None) -> None:
    """Call main(); expected input errors exit 2 with one line naming the problem.

    `quiet` (the script's name) routes other libraries' warnings to a per-rank log file first
    (route_third_party_output); EASYEP_VERBOSE=1 keeps everything on the terminal."""
    if quiet and os.environ.get("EASYEP_VERBOSE", "0") in ("", "0"):
        route_third_party_output(quiet)
    from megatron_easyep.checkpoint.reader import CheckpointError
    from megatron_easyep.runtime.stop import RunInterrupted
    from megatron_easyep.scoring.demos import DemoError

    try:
        main()
        _close_process_groups()
    except RunInterrupted as e:  # SIGINT/SIGTERM: stopped at a step boundary, snapshot written
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except RuntimeError as e:  # DistError, or gloo's plain RuntimeError when a peer's socket closes
        if not _collective_failed(e):
            raise
        rank = os.environ.get("RANK", "0")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: rank {rank}: a collective with the other ranks failed ({first}); another rank "
              "died or did not answer within --dist-timeout (torchrun's summary names the first rank "
              "that failed). The same command with --resume continues from the last snapshot",
              file=sys.stderr, flush=True)
        sys.exit(1)
    except (CheckpointError, DemoError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except OSError as e:  # a write that failed (disk full, quota, file size limit, read-only): io names the path
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


def _close_process_groups() -> None:
    """After a successful run: wait for every rank, then destroy the process groups. Left to the
    interpreter's exit, gloo's teardown can race a peer's closing socket and abort a finished rank
    ("terminate called without an active exception", SIGABRT: a failed run after all its work;
    pytorch/pytorch#190489)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    from megatron_easyep.mcore import parallel

    if dist.get_world_size() > 1:
        dist.barrier()
    parallel.shutdown()


def _collective_failed(error: RuntimeError) -> bool:
    """A collective that failed because another rank is gone or hung (not a bug in this rank)."""
    import re

    import torch.distributed as dist

    if isinstance(error, dist.DistError):
        return True
    return (dist.is_initialized() and dist.get_world_size() > 1
            and re.search(r"gloo|NCCL|Connection (reset|closed)|[Tt]imed out", str(error)) is not None)


def add_allow_unexpected(parser) -> None:
    parser.add_argument("--allow-unexpected-tensors", action="store_true",
                        help="accept checkpoint tensors config.json does not describe (vendor extras); "
                             "index entries that disagree with the shards are still refused")


def apply_allow_unexpected(enabled: bool) -> None:
    """The checkpoint reader takes it from the environment, so every rank and loader sees it."""
    if enabled:
        import os

        from megatron_easyep.checkpoint.reader import ALLOW_UNEXPECTED_ENV

        os.environ[ALLOW_UNEXPECTED_ENV] = "1"
