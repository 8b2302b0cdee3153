"""``moecc report --graph`` / ``--block PATH`` (issue 14): the graph view from the command line, HTML folded."""
import os
import re
import textwrap

import pytest

from moecc import cli

TESTS = os.path.dirname(os.path.abspath(__file__))

SCRIPT = textwrap.dedent(f"""
    import sys
    import torch
    sys.path.insert(0, {TESTS!r})
    import moe_zoo
    torch.manual_seed(0)
    model = moe_zoo.TinyTransformer(layers=2)
    torch.compile(model, backend="moecc")(torch.randint(0, 64, (1, 4)))
""")


@pytest.fixture(scope="module", autouse=True)
def _fresh_dynamo_cache_after():
    """Leave no compiled graph behind: a later test compiling the same model class must trace it again."""
    yield
    import torch

    torch._dynamo.reset()


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    path = tmp_path_factory.mktemp("report_cli") / "two_layers.py"
    path.write_text(SCRIPT)
    return str(path)


def test_graph_prints_every_block_view_and_html_folds_each(script, tmp_path, capsys):
    html = tmp_path / "r.html"
    assert cli.main(["report", "--graph", "--html", str(html), script]) == 0
    printed = capsys.readouterr().out
    assert printed.index("moecc: MoE blocks") < printed.index("moes.0 (") < printed.index("moes.1 (")
    assert printed.count("moecc::expert_ffn") == 2 and "index_add_" in printed
    page = html.read_text()
    assert len(re.findall(r"<details", page)) == 3  # the summary and one section per block
    assert "moes.1" in page and "moecc::sort_by_slot" in page


def test_block_prints_only_that_block(script, capsys):
    # (the previous test compiled the same model class in this process: the command still reports its blocks)
    assert cli.main(["report", "--block", "moes.1", script]) == 0
    printed = capsys.readouterr().out
    assert "moes.1 (" in printed and "moes.0" not in printed and "moecc: MoE blocks" not in printed


def test_block_not_in_the_report_is_refused_with_the_known_ones(script, capsys):
    assert cli.main(["report", "--block", "moes.9", script]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moecc: error: ") and "moes.9" in err and "moes.0, moes.1" in err
