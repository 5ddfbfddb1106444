# Two commands on a fresh machine: `make demo` (CPU demo on a small trained MoE, 2 torchrun ranks) and `make test`.
# Python 3.12 is required by megatron-core 0.19 (see pyproject.toml). The venv gets CI's exact
# versions (constraints.txt); pyproject.toml declares the tested ranges (README: Install).
PY312 := $(shell for p in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12; do \
	"$$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1 && { echo "$$p"; break; }; done)
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup demo test tools gpu-wheels

$(STAMP): pyproject.toml constraints.txt
	@test -n "$(PY312)" || { echo "error: Python 3.12 not found (megatron-core 0.19 needs it)"; exit 1; }
	test -x $(VENV)/bin/python || $(PY312) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash launch/demo.sh

# shellcheck lints the SLURM templates (tests/test_slurm.py skips that check without it)
tools:
	@command -v shellcheck >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq shellcheck >/dev/null; } || echo "note: shellcheck not installed"

test: $(STAMP) tools
	$(VENV)/bin/python -m pytest -q tests

# megatron-core as a wheel for the lent GPU machine (bench/gpu_check.sh; nothing is installable there)
gpu-wheels: $(STAMP)
	$(VENV)/bin/pip download -q --no-deps -d wheels -c constraints.txt megatron-core
