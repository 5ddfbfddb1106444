"""mcore/compat: the start-up contract check fails clearly when an assumption about Megatron-Core
internals is broken on purpose (a signature, a class, the version, g inside the experts, the FP8
swap), and the DeepSeek group rule applies only where it differs from Megatron's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_easyep.mcore.compat import contract, routing
from megatron_easyep.mcore.compat.contract import ContractError

TESTS = Path(__file__).resolve().parent


def test_contract_holds_on_the_installed_megatron_core():
    assert contract.verify_installed() == []
    contract.check_installed(force=True)


def _broken(monkeypatch_target) -> str:
    with pytest.raises(ContractError) as info:
        contract.check_installed(force=True)
    message = str(info.value)
    assert contract.installed_version() in message and "0.19.x" in message
    return message


def test_contract_names_the_version_outside_the_range(monkeypatch):
    from megatron.core import package_info

    monkeypatch.setattr(package_info, "__version__", "0.20.1")
    message = _broken(package_info)
    assert "megatron-core version is 0.19.x" in message and "0.20.1" in message


def test_contract_names_a_changed_signature_of_an_overridden_private(monkeypatch):
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    def _resolve_qk_norm_config(self, submodules, pg_collection):  # a new parameter upstream
        raise AssertionError("never called")

    monkeypatch.setattr(MLASelfAttention, "_resolve_qk_norm_config", _resolve_qk_norm_config)
    message = _broken(MLASelfAttention)
    assert "_resolve_qk_norm_config" in message and "pg_collection" in message
    assert message.count("\n  - ") == 1  # only the broken assumption is listed


def test_contract_names_a_changed_alltoall_forward(monkeypatch):
    from megatron.core.tensor_parallel import mappings

    def forward(ctx, group, input, output_split_sizes, input_split_sizes, use_nccl_stream, async_op):
        raise AssertionError("never called")

    monkeypatch.setattr(mappings._AllToAll, "forward", staticmethod(forward))
    message = _broken(mappings)
    assert "_AllToAll.forward" in message and "async_op" in message


def test_contract_names_a_replaced_routing_entry(monkeypatch):
    """group_limited_topk with other parameter names would ignore Megatron's keyword call."""
    from megatron.core.transformer.moe import moe_utils

    monkeypatch.setattr(moe_utils, "group_limited_topk", lambda scores, k, tokens, experts, groups, gk: None)
    assert "group_limited_topk" in _broken(moe_utils)


def test_contract_names_a_swapped_attention_class():
    """The local spec's attention must be exactly MLASelfAttention (what compat/mla.py subclasses)."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    spec = ModuleSpec(module=dict, submodules=None)
    with pytest.raises(ContractError, match="MLASelfAttention.*'dict'.*installed megatron-core"):
        contract.check_local_attention_spec(spec)


@pytest.mark.parametrize("topk, experts, groups, group_topk, differs", [
    (8, 256, 8, 4, False),   # DeepSeek-V3/R1: 8 // 4 == 2, Megatron's own rule
    (4, 16, 4, 2, False),    # the tiny fixtures
    (6, 16, 4, 2, True),     # top 3 per group vs top 2
    (4, 16, 4, 1, True),
    (4, 16, 4, 4, False),    # every group kept
    (4, 16, 1, 1, False),    # one group
    (4, 16, None, None, False),
    (4, 8, 8, 2, True),      # 4 // 2 = 2 but a group has 1 expert: top-1 vs Megatron's crash
])
def test_group_rule_is_installed_only_where_it_differs(topk, experts, groups, group_topk, differs):
    assert routing.group_rules_differ(topk, experts, groups, group_topk) is differs


def test_contract_checks_on_a_built_model_and_the_routing_rule(tiny_checkpoint_factory):
    checkpoint = tiny_checkpoint_factory(fp8=True, seed=3)
    proc = subprocess.run([sys.executable, str(TESTS / "compat_worker.py"), str(checkpoint)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    r = found["routing"]
    assert not r["installed_for_agreeing_config"] and r["moe_utils_untouched_for_agreeing_config"]
    assert r["installed_for_differing_config"]
    assert r["agreeing_bitwise_equal"] and r["differing_changed"] and r["differing_is_deepseek"]
    m = found["model"]
    assert m["banner_lines"] == [] and m["fp8_linears"] > 0
    assert m["fp8_check_ok"] is None and m["gate_ok"] is None
    assert "still plain" in m["fp8_check_broken"] and "linear_fc1" in m["fp8_check_broken"]
    assert "applies the routing weight g inside the expert" in m["gate_broken"]
    assert "installed megatron-core" in m["gate_broken"]
