"""Quiet launches: other libraries' warnings go to a per-rank log file, ours and every error stay
on the terminal (launch/_cli.py); the export CLI shows bytes written of the total."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

# A launch script in miniature: what launch/score.py does (import _cli, run_main(main, quiet=...)),
# with a main that emits one of each kind of message. Warnings are raised with explicit file names
# so "ours" (a file of this checkout) and "theirs" (an installed library) are known independently.
SCRIPT = textwrap.dedent("""
    import logging, sys, warnings
    sys.path.insert(0, {launch!r})
    import _cli

    def main():
        warnings.warn_explicit("THEIR-WARNING", UserWarning, "/usr/lib/python3/site-packages/lib/x.py", 3)
        warnings.warn_explicit("OUR-WARNING", UserWarning, {ours!r}, 7)
        logging.getLogger("megatron.core.models").warning("THEIR-LOG-WARNING")
        logging.getLogger("megatron.core.models").error("THEIR-LOG-ERROR")
        logging.getLogger("megatron_easyep.scoring").warning("OUR-LOG-WARNING")
        logging.getLogger("torch.utils.cpp_extension").warning("TORCH-LOG-WARNING")
        print("PROGRESS", file=sys.stderr)
        raise ValueError("BAD-INPUT")

    _cli.run_main(main, quiet="mini")
""")


def _run(tmp_path, rank: str, **env):
    script = tmp_path / "mini.py"
    script.write_text(SCRIPT.format(launch=str(REPO / "launch"), ours=str(REPO / "launch" / "score.py")))
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("EASYEP_VERBOSE", "EASYEP_RUN_LOG_DIR", "EASYEP_WARNINGS_LOG_DIR")}
    full_env.update(RANK=rank, TORCHELASTIC_RUN_ID="abcdef123456", PYTHONPATH=str(REPO), **env)
    return subprocess.run([PYTHON, str(script)], capture_output=True, text=True, cwd=tmp_path,
                          env=full_env, timeout=120)


def test_third_party_warnings_go_to_the_rank_log(tmp_path):
    run = _run(tmp_path, "0")
    assert run.returncode == 2, run.stderr  # run_main's input-error exit
    log = tmp_path / "runs" / "logs" / "mini-abcdef12" / "mini-rank0.log"
    assert log.is_file(), run.stderr
    text = log.read_text()
    for theirs in ("THEIR-WARNING", "THEIR-LOG-WARNING", "TORCH-LOG-WARNING"):
        assert theirs in text and theirs not in run.stderr, (theirs, run.stderr)
    for ours in ("OUR-WARNING", "OUR-LOG-WARNING", "THEIR-LOG-ERROR", "PROGRESS", "error: BAD-INPUT"):
        assert ours in run.stderr, (ours, run.stderr)
    # rank 0 names the files once, before anything else
    first = run.stderr.splitlines()[0]
    assert first == "other libraries' warnings: runs/logs/mini-abcdef12/mini-rank*.log", first


def test_other_ranks_stay_silent_and_verbose_keeps_everything(tmp_path):
    run = _run(tmp_path, "1")
    assert "other libraries' warnings" not in run.stderr
    assert "THEIR-WARNING" not in run.stderr and "OUR-WARNING" in run.stderr
    assert (tmp_path / "runs" / "logs" / "mini-abcdef12" / "mini-rank1.log").is_file()

    verbose = _run(tmp_path, "0", EASYEP_VERBOSE="1", EASYEP_WARNINGS_LOG_DIR=str(tmp_path / "elsewhere"))
    assert "THEIR-WARNING" in verbose.stderr and "THEIR-LOG-WARNING" in verbose.stderr
    assert not (tmp_path / "elsewhere").exists()


def test_log_directory_from_the_environment(tmp_path):
    run = _run(tmp_path, "0", EASYEP_WARNINGS_LOG_DIR=str(tmp_path / "mine"))
    assert "THEIR-WARNING" in (tmp_path / "mine" / "mini-rank0.log").read_text(), run.stderr


def test_export_shows_bytes_written_of_the_total(tiny_checkpoint_factory, tmp_path):
    """The progress total is computed from the selection before writing; the exporter's own index
    records the bytes it wrote (metadata.total_size): the two must agree."""
    from megatron_easyep.progress import format_amount
    import torch

    from megatron_easyep.checkpoint.reader import DeepseekV3Config
    from megatron_easyep.checkpoint.io import write_score_file

    ckpt = tiny_checkpoint_factory()
    config = DeepseekV3Config.load(ckpt)
    experts, layers = config.n_routed_experts, config.moe_layer_ids
    scores = tmp_path / "scores"
    rows = torch.arange(len(layers) * experts, dtype=torch.float64).reshape(len(layers), experts)
    write_score_file(scores, {"gate": rows}, layers, config.config_hash, [])
    out = tmp_path / "pruned"
    run = subprocess.run([PYTHON, str(REPO / "converters" / "export_pruned.py"), "--hf-checkpoint", str(ckpt),
                          "--scores", str(scores), "--output", str(out), "--keep", str(experts // 2),
                          "--metric", "gate"],
                         capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                         timeout=120)
    assert run.returncode == 0, run.stderr
    written = json.loads((out / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    total = format_amount(written, "bytes")
    lines = [line for line in run.stderr.splitlines() if line.startswith("export ")]
    assert lines and lines[-1].startswith(f"export  {total}/{total}  100%") and lines[-1].endswith("done"), run.stderr
    assert "writing " not in run.stderr  # the per-shard lines became the progress line
