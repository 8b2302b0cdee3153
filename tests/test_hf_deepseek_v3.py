"""DeepSeek-V3 (transformers 5.x) under backend="moecc": fp32 sigmoid scores, e_score_correction_bias for selection only, group-limited top-k (sum of top-2 per group), weights gathered from the unbiased scores, renormalised, times routed_scaling_factor, a shared expert.

Built from its config class at tiny size (tests/hf_zoo.py); the checks are hf_checks.FamilyChecks: the whole
model with the "eager" experts implementation, one "grouped_mm" block compiled alone (and, marked slow, the whole model).
"""
import pytest
from hf_checks import FamilyChecks, WholeGroupedMMCheck
from hf_zoo import Family

pytest.importorskip("transformers")


class TestDeepseekV3(FamilyChecks, WholeGroupedMMCheck):
    FAMILY = Family(name="deepseek_v3", ffn="swiglu", shared=('shared_experts',),
                    router={'score': 'sigmoid', 'top_k': 2, 'score_after_topk': False, 'renormalize': True, 'selection_bias': True, 'router_bias': False, 'grouped': True, 'scale': True},
                    layouts=tuple(['gate_up_proj [64, 16]', 'down_proj [16, 32]']))
