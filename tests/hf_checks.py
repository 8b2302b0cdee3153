"""The checks every decoder-only HF family passes, as base classes its test module subclasses with its FAMILY."""
import pytest
from hf_zoo import (
    Compiled,
    Family,
    assert_blocks_report_family,
    assert_grouped_mm_block_equals_eager,
    assert_pairs_close,
    assert_whole_grouped_mm_model_equals_eager,
)


class FamilyChecks:
    """The checks every decoder-only family passes; a family's test module subclasses this with its ``FAMILY``.

    The whole model is compiled in training mode with the "eager" experts implementation (the loop that
    graph-breaks under stock torch.compile), once per family; the "grouped_mm" implementation is checked on one
    block compiled alone with fullgraph=True.
    """

    FAMILY: Family

    @pytest.fixture(scope="class")
    def eager_impl(self):
        return Compiled(self.FAMILY.name, "eager")

    def test_every_block_is_rewritten_and_reported_with_the_family_facts(self, eager_impl):
        assert_blocks_report_family(eager_impl.records, self.FAMILY)

    def test_one_graph_and_no_graph_break(self, eager_impl):
        assert (eager_impl.graphs, eager_impl.breaks) == (1, 0)

    def test_logits_and_every_gradient_equal_eager(self, eager_impl):
        assert_pairs_close([("logits", eager_impl.out, eager_impl.ref), *eager_impl.grads()])

    def test_grouped_mm_block_has_no_graph_break_and_equals_eager(self):
        assert_grouped_mm_block_equals_eager(self.FAMILY)


class WholeGroupedMMCheck:
    """For the families whose grouped_mm experts are also checked in a whole model (slow)."""

    FAMILY: Family

    @pytest.mark.slow
    def test_whole_model_with_grouped_mm_experts_is_rewritten_and_equals_eager(self):
        assert_whole_grouped_mm_model_equals_eager(self.FAMILY)
