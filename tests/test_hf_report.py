"""``moecc report SCRIPT_OR_MODULE``: runs a sample in-process, prints the blocks it compiled, exports HTML/SVG."""
import os
import textwrap

from moecc import cli

TESTS = os.path.dirname(os.path.abspath(__file__))

SCRIPT = textwrap.dedent(f"""
    import sys
    import torch
    sys.path.insert(0, {TESTS!r})
    import moe_zoo
    model = moe_zoo.TinyTransformer(layers=int(sys.argv[1]))
    torch.compile(model, backend="moecc")(torch.randint(0, 64, (1, 4)))
""")


def test_report_command_runs_the_script_and_writes_html_and_svg(tmp_path, capsys):
    script = tmp_path / "sample.py"
    script.write_text(SCRIPT)
    html, svg = tmp_path / "r.html", tmp_path / "r.svg"
    code = cli.main(["report", "--html", str(html), "--svg", str(svg), str(script), "2"])
    printed = capsys.readouterr().out
    assert code == 0
    for text in (printed, html.read_text()):
        assert "moes.0" in text and "moes.1" in text and "rewritten" in text and "softmax" in text
    assert "moes.2" not in printed  # the script's argument (2 layers) reached it
    assert svg.read_text().lstrip().startswith("<svg")


def test_report_command_fails_when_nothing_was_compiled(tmp_path, capsys):
    script = tmp_path / "nothing.py"
    script.write_text("x = 1\n")
    assert cli.main(["report", str(script)]) == 1
    assert "compiled no MoE block" in capsys.readouterr().err


def test_report_exports_html_and_svg_without_printing(tmp_path, capsys):
    from moecc.passes.moe_pass import BlockResult
    from moecc.passes.spec import ExpertsSpec, MoESpec, RouterSpec
    from moecc.report import Report

    spec = MoESpec(path="model.layers.0.mlp", form="loop", num_experts=4, router=RouterSpec(score="softmax", top_k=1),
                   experts=ExpertsSpec(ffn="mlp-relu", weights="modulelist", path="experts", params=("wi.weight",),
                                       layouts=("wi.weight [32, 16]",)),
                   notes=["capacity: a token past its expert's capacity is dropped"])
    report = Report([BlockResult(spec=spec, outcome="rewritten", graph="graph 0")])
    report.save_html(str(tmp_path / "r.html"))
    report.save_svg(str(tmp_path / "r.svg"))
    assert capsys.readouterr().out == ""
    html = (tmp_path / "r.html").read_text()
    for fact in ("model.layers.0.mlp", "E=4", "k=1", "softmax", "mlp-relu", "wi.weight [32, 16]", "capacity"):
        assert fact in html, fact
    assert "model.layers.0.mlp" in (tmp_path / "r.svg").read_text().replace("&#160;", " ")
