"""Shared fixtures: tiny DeepSeek-V3 checkpoints, built once per session.

Cached checkpoints are shared between tests: copy one (shutil.copytree) before modifying it.
Test helpers in this directory import as top-level modules (``from hf_oracle import ...``).
"""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

TESTS_DIR = pathlib.Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from megatron_easyep.checkpoint.tiny import make_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint_factory(tmp_path_factory):
    """make(preset="tiny", *, fp8=False, seed=0, num_shards=3, **overrides) -> path, memoised."""
    cache: dict[str, pathlib.Path] = {}

    def make(preset: str = "tiny", *, fp8: bool = False, seed: int = 0, num_shards: int = 3, **overrides):
        key = json.dumps([preset, fp8, seed, num_shards, overrides], sort_keys=True)
        if key not in cache:
            out_dir = tmp_path_factory.mktemp(f"{preset}{'_fp8' if fp8 else ''}") / "checkpoint"
            cache[key] = make_tiny_checkpoint(
                out_dir, preset, fp8=fp8, seed=seed, num_shards=num_shards, **overrides
            )
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_checkpoint_factory) -> pathlib.Path:
    """The default tiny bf16 checkpoint (seed 0, 3 shards)."""
    return tiny_checkpoint_factory()


@pytest.fixture(scope="session")
def tiny_fp8_ckpt(tiny_checkpoint_factory) -> pathlib.Path:
    """The same weights as ``tiny_ckpt``, DeepSeek block-wise FP8 (128x128 blocks)."""
    return tiny_checkpoint_factory(fp8=True)
