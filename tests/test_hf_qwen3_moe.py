"""Qwen3-MoE (transformers 5.x) under backend="moecc": softmax top-2 renormalised (norm_topk_prob=True); stacked SwiGLU experts, no shared expert.

Built from its config class at tiny size (tests/hf_zoo.py); the checks are hf_checks.FamilyChecks: the whole
model with the "eager" experts implementation, one "grouped_mm" block compiled alone.
"""
import pytest
from hf_checks import FamilyChecks
from hf_zoo import Family

pytest.importorskip("transformers")


class TestQwen3Moe(FamilyChecks):
    FAMILY = Family(name="qwen3_moe", ffn="swiglu",
                    router={'score': 'softmax', 'top_k': 2, 'score_after_topk': False, 'renormalize': True, 'selection_bias': False, 'router_bias': False, 'grouped': False, 'scale': False},
                    layouts=tuple(['gate_up_proj [64, 16]', 'down_proj [16, 32]']))
