"""A Hugging Face Mixtral, built from its config (no download), compiled with backend="moecc".

    python samples/hf_mixtral.py [--experts-implementation eager|grouped_mm] [--html report.html]
    moecc report --svg report.svg samples/hf_mixtral.py       # the same, report exported by the CLI

HF's "eager" experts loop graph-breaks under stock torch.compile; under moecc it is traced whole and both
implementations become the same expert-slot form. The compiled model's logits and a training step equal eager's.
"""
from __future__ import annotations

import argparse
import copy

import torch
from transformers import MixtralConfig, MixtralForCausalLM

import moecc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts-implementation", default="eager", choices=["eager", "grouped_mm"])
    parser.add_argument("--html", help="write the report as HTML")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2)
    config._experts_implementation = args.experts_implementation
    model = MixtralForCausalLM(config)
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, backend="moecc")

    tokens = torch.randint(0, 128, (2, 16))
    ours, ref = compiled(tokens, labels=tokens), twin(tokens, labels=tokens)
    print(f"logits max |moecc - eager| = {float((ours.logits - ref.logits).abs().max()):.2e}")
    ours.loss.backward()
    ref.loss.backward()
    grad_diff = max(float((p.grad - q.grad).abs().max()) for p, q in zip(model.parameters(), twin.parameters())
                    if p.grad is not None)
    print(f"loss {ours.loss.item():.6f} (eager {ref.loss.item():.6f}); max gradient difference {grad_diff:.2e}")

    report = moecc.report()
    print(report)
    if args.html:
        report.save_html(args.html)


if __name__ == "__main__":
    main()
