"""Shared command-line plumbing for launch/ entry points: YAML defaults + overrides, and one
place that turns bad input into a clear message and a non-zero exit."""

from __future__ import annotations

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


def run_main(main) -> None:
    """Call main(); expected input errors exit 2 with one line naming the problem."""
    import os

    from megatron_easyep.checkpoint.reader import CheckpointError
    from megatron_easyep.runtime.stop import RunInterrupted
    from megatron_easyep.scoring.demos import DemoError

    try:
        main()
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
