"""moecc demo: compile an unmodified Mixtral-style MoE model with backend="moecc", train it, and print the report.

Run: python samples/demo.py
"""
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn


class Expert(nn.Module):
    def __init__(self, dim, ffn):
        super().__init__()
        self.w1, self.w3 = nn.Linear(dim, ffn, bias=False), nn.Linear(dim, ffn, bias=False)
        self.w2 = nn.Linear(ffn, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class SparseMoeBlock(nn.Module):
    """The classic Mixtral block: softmax router, top-2, renormalise, a loop over experts with where/index_add_."""

    def __init__(self, dim, ffn, num_experts=8, top_k=2):
        super().__init__()
        self.top_k, self.num_experts = top_k, num_experts
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleList([Expert(dim, ffn) for _ in range(num_experts)])

    def forward(self, hidden):
        B, S, D = hidden.shape
        x = hidden.view(-1, D)
        logits = self.gate(x)
        weights, chosen = torch.topk(F.softmax(logits, dim=-1, dtype=torch.float), self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        mask = F.one_hot(chosen, num_classes=self.num_experts).permute(2, 1, 0)
        for e in range(self.num_experts):
            k_idx, t_idx = torch.where(mask[e])
            out.index_add_(0, t_idx, self.experts[e](x[t_idx]) * weights[t_idx, k_idx, None])
        return out.view(B, S, D)


class TinyMoELM(nn.Module):
    def __init__(self, vocab=256, dim=64, ffn=128, layers=2, num_experts=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norms = nn.ModuleList([nn.RMSNorm(dim) for _ in range(layers)])
        self.moes = nn.ModuleList([SparseMoeBlock(dim, ffn, num_experts) for _ in range(layers)])
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens):
        h = self.embed(tokens)
        for norm, moe in zip(self.norms, self.moes):
            h = h + moe(norm(h))
        return self.head(h)


def main():
    torch.manual_seed(0)
    model = TinyMoELM()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="moecc")  # no import of moecc needed: found by entry point
    opts = [torch.optim.AdamW(m.parameters(), lr=3e-3) for m in (model, eager)]
    text = torch.tensor(list(open(__file__, "rb").read()[:4096]))  # train on this file's own bytes
    for step in range(6):
        start = torch.randint(0, text.numel() - 65, (8,))
        batch = torch.stack([text[s : s + 65] for s in start.tolist()])
        losses = []
        for m, opt in zip((compiled, eager), opts):
            t = time.perf_counter()
            loss = F.cross_entropy(m(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append((loss.item(), time.perf_counter() - t))
        print(f"step {step}: moecc loss {losses[0][0]:.4f} ({losses[0][1]:.2f}s)   "
              f"eager loss {losses[1][0]:.4f} ({losses[1][1]:.2f}s)")
    diff = max((a - b).abs().max().item() for a, b in zip(model.parameters(), eager.parameters()))
    print(f"max parameter difference moecc vs eager after 6 AdamW steps: {diff:.2e}")

    from rich.console import Console

    import moecc

    Console(width=150).print(moecc.report())


if __name__ == "__main__":
    main()
