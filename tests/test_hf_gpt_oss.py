"""GPT-OSS (transformers 5.x) under backend="moecc": router linear with a bias, top-k of the logits, softmax over the k; experts transposed [E, H, 2F] with biases, interleaved gate/up ([..., ::2]), clamped SwiGLU (up + 1) * gate * sigmoid(alpha * gate).

Built from its config class at tiny size (tests/hf_zoo.py); the checks are hf_checks.FamilyChecks: the whole
model with the "eager" experts implementation, one "grouped_mm" block compiled alone (and, marked slow, the whole model).
"""
import pytest
from hf_checks import FamilyChecks, WholeGroupedMMCheck
from hf_zoo import Family

pytest.importorskip("transformers")


class TestGptOss(FamilyChecks, WholeGroupedMMCheck):
    FAMILY = Family(name="gpt_oss", ffn="glu-sigmoid",
                    router={'score': 'logits', 'top_k': 2, 'score_after_topk': True, 'renormalize': False, 'selection_bias': False, 'router_bias': True, 'grouped': False, 'scale': False},
                    layouts=tuple(['gate_up_proj [16, 64]', 'gate_up_proj_bias [64]', 'down_proj [32, 16]', 'down_proj_bias [16]']))
