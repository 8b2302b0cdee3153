"""moecc's compile options: typed, documented, and a misspelt key is refused instead of silently ignored."""
import math

import moe_zoo as zoo
import pytest
import torch

from moecc.options import Options


def test_moecc_keys_are_parsed_and_the_rest_go_to_inductor():
    options = Options.parse({"moecc.fused_ffn": False, "moecc.capacity_factor": 2, "max_autotune": True})
    assert options.fused_ffn is False and options.capacity_factor == 2.0
    assert options.inductor == {"max_autotune": True}
    assert Options.parse(None) == Options()


def test_an_unknown_moecc_key_is_refused_with_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown option moecc\.fused_fnn; valid: moecc\.rewrite, moecc\.fused_ffn"):
        Options.parse({"moecc.fused_fnn": False})


@pytest.mark.parametrize("key, value, words", [
    ("moecc.fused_ffn", "no", "must be True or False"),
    ("moecc.slots_per_rank", 0, "must be a positive int"),
    ("moecc.capacity_factor", -1.0, "must be a number > 0"),
    ("moecc.capacity_factor", math.nan, "must be a number > 0"),
])
def test_a_bad_value_is_refused_naming_the_option(key, value, words):
    with pytest.raises(ValueError, match=f"{key.replace('.', '[.]')} {words}"):
        Options.parse({key: value})


def test_every_option_has_a_description():
    docs = Options.documented()
    assert set(docs) == {"moecc." + k for k in ("rewrite", "fused_ffn", "ep", "group", "slots_per_rank",
                                               "placement", "capacity_factor", "overlap_chunks", "node_size",
                                               "all_to_all",
                                               "pool")}
    assert all(len(text) > 20 for text in docs.values())


@pytest.mark.parametrize("key, value", [("overlap_chunks", 0), ("overlap_chunks", "many"), ("overlap_chunks", True),
                                        ("node_size", 0), ("node_size", 2.0),
                                        ("all_to_all", "3d")])
def test_exchange_options_refuse_bad_values_by_name(key, value):
    with pytest.raises(ValueError, match=f"moecc.{key} must be"):
        Options.parse({f"moecc.{key}": value})


def test_torch_compile_refuses_a_misspelt_option_before_compiling():
    torch._dynamo.reset()
    compiled = torch.compile(zoo.LoopMoE(), backend="moecc", options={"moecc.fusedffn": False})
    with pytest.raises(Exception, match=r"unknown option moecc\.fusedffn"):
        compiled(torch.randn(1, 3, 16))
