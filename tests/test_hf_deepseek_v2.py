"""DeepSeek-V2 (transformers 5.x) under backend="moecc": fp32 softmax, group-limited greedy top-k (group max, keep topk_group groups), weights times routed_scaling_factor, no renormalisation, a shared expert.

Built from its config class at tiny size (tests/hf_zoo.py); the checks are hf_checks.FamilyChecks: the whole
model with the "eager" experts implementation, one "grouped_mm" block compiled alone.
"""
import pytest
from hf_checks import FamilyChecks
from hf_zoo import Family

pytest.importorskip("transformers")


class TestDeepseekV2(FamilyChecks):
    FAMILY = Family(name="deepseek_v2", ffn="swiglu", shared=('shared_experts',),
                    router={'score': 'softmax', 'top_k': 2, 'score_after_topk': False, 'renormalize': False, 'selection_bias': False, 'router_bias': False, 'grouped': True, 'scale': True},
                    layouts=tuple(['gate_up_proj [64, 16]', 'down_proj [16, 32]']))
