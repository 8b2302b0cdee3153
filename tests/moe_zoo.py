"""MoE layers written the ways users write them: one class per form moecc must recognise.

(a) ModuleList experts, range(E) loop, torch.where + index_add_ (Mixtral / FastMoE style)
(b) stacked 3-D expert weights with a per-expert loop
(c) HF transformers 5.x experts implementations (grouped_mm, batched_mm): see tests/test_hf_forms.py
(d) dense-masked: every expert on every token, weighted by a sparse [T, E] gate matrix
(e) sort-based: argsort, histc or bincount, split by counts, cat, un-sort
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLUExpert(nn.Module):
    def __init__(self, dim: int, ffn: int, bias: bool = False):
        super().__init__()
        self.w1 = nn.Linear(dim, ffn, bias=bias)
        self.w3 = nn.Linear(dim, ffn, bias=bias)
        self.w2 = nn.Linear(ffn, dim, bias=bias)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GeluExpert(nn.Module):
    def __init__(self, dim: int, ffn: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, ffn)
        self.fc2 = nn.Linear(ffn, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Router(nn.Module):
    """softmax -> top-k -> optional renormalisation (Mixtral, OLMoE, Qwen)."""

    def __init__(self, dim: int, num_experts: int, top_k: int, renormalize: bool = True):
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.top_k, self.renormalize = top_k, renormalize

    def forward(self, x_TD):
        logits_TE = self.gate(x_TD)
        probs_TE = F.softmax(logits_TE, dim=-1, dtype=torch.float)
        weights_TK, experts_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        if self.renormalize:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        return logits_TE, weights_TK.to(x_TD.dtype), experts_TK


class LoopMoE(nn.Module):
    """(a) Mixtral-style: ModuleList experts, `for e in range(E)`, torch.where + index_add_."""

    def __init__(self, dim=16, ffn=32, num_experts=4, top_k=2, expert_cls=SwiGLUExpert, renormalize=True):
        super().__init__()
        self.num_experts = num_experts
        self.router = Router(dim, num_experts, top_k, renormalize)
        self.experts = nn.ModuleList([expert_cls(dim, ffn) for _ in range(num_experts)])

    def forward(self, hidden_BSD):
        B, S, D = hidden_BSD.shape
        x_TD = hidden_BSD.view(-1, D)
        logits_TE, weights_TK, experts_TK = self.router(x_TD)
        out_TD = torch.zeros_like(x_TD)
        mask_EKT = F.one_hot(experts_TK, num_classes=self.num_experts).permute(2, 1, 0)
        for e in range(self.num_experts):
            k_idx, t_idx = torch.where(mask_EKT[e])
            rows = self.experts[e](x_TD[t_idx]) * weights_TK[t_idx, k_idx, None]
            out_TD.index_add_(0, t_idx, rows.to(x_TD.dtype))
        return out_TD.view(B, S, D), logits_TE


class StackedLoopMoE(nn.Module):
    """(b) stacked [E, 2F, D] gate/up and [E, D, F] down weights, per-expert loop over a one-hot mask."""

    def __init__(self, dim=16, ffn=32, num_experts=4, top_k=2):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.gate_up_proj = nn.Parameter(torch.randn(num_experts, 2 * ffn, dim) / dim**0.5)
        self.down_proj = nn.Parameter(torch.randn(num_experts, dim, ffn) / ffn**0.5)

    def forward(self, x_TD):
        probs_TE = F.softmax(self.gate(x_TD), dim=-1)
        weights_TK, experts_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
        out_TD = torch.zeros_like(x_TD)
        mask_ETK = F.one_hot(experts_TK, self.num_experts).permute(2, 0, 1)
        for e in range(self.num_experts):
            t_idx, k_idx = torch.where(mask_ETK[e])
            gate, up = F.linear(x_TD[t_idx], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down_proj[e])
            out_TD.index_add_(0, t_idx, y * weights_TK[t_idx, k_idx].unsqueeze(-1))
        return out_TD


class DenseMaskedMoE(nn.Module):
    """(d) every expert runs on every token; a sparse [T, E] gate matrix (zeros off the top-k) weights them."""

    def __init__(self, dim=16, ffn=32, num_experts=4, top_k=2):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleList([GeluExpert(dim, ffn) for _ in range(num_experts)])

    def forward(self, x_BSD):
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        scores_TE = torch.sigmoid(self.gate(x_TD))
        weights_TK, experts_TK = torch.topk(scores_TE, self.top_k, dim=-1)
        gates_TE = torch.zeros_like(scores_TE).scatter(1, experts_TK, weights_TK)
        out_TD = sum(gates_TE[:, e : e + 1] * expert(x_TD) for e, expert in enumerate(self.experts))
        return out_TD.reshape(x_BSD.shape)


class SortedMoE(nn.Module):
    """(e) sort-based dispatch: argsort by expert, counts, split, per-expert FFN, cat, un-sort, weighted sum."""

    def __init__(self, dim=16, ffn=32, num_experts=4, top_k=2, counts="histc"):
        super().__init__()
        self.num_experts, self.top_k, self.counts = num_experts, top_k, counts
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleList([SwiGLUExpert(dim, ffn) for _ in range(num_experts)])

    def forward(self, x_TD):
        T, D = x_TD.shape
        weights_TK, experts_TK = torch.topk(F.softmax(self.gate(x_TD), dim=-1), self.top_k, dim=-1)
        flat_N = experts_TK.reshape(-1)
        order_N = torch.argsort(flat_N, stable=True)
        if self.counts == "histc":
            counts_E = torch.histc(flat_N.float(), bins=self.num_experts, min=0, max=self.num_experts - 1).long()
        else:
            counts_E = torch.bincount(flat_N, minlength=self.num_experts)
            torch._check(counts_E.size(0) == self.num_experts)
        x_sorted_ND = x_TD[order_N // self.top_k]
        outs = [expert(chunk) for expert, chunk in zip(self.experts, x_sorted_ND.split(counts_E.tolist()))]
        y_sorted_ND = torch.cat(outs)
        y_ND = torch.empty_like(y_sorted_ND)
        y_ND[order_N] = y_sorted_ND
        return (y_ND.view(T, self.top_k, D) * weights_TK.unsqueeze(-1)).sum(dim=1)


class SharedExpertMoE(nn.Module):
    """(a) with a shared expert behind a sigmoid gate (Qwen2-MoE style), and a residual around the block."""

    def __init__(self, dim=16, ffn=32, num_experts=4, top_k=2):
        super().__init__()
        self.moe = LoopMoE(dim, ffn, num_experts, top_k, renormalize=False)
        self.shared_expert = SwiGLUExpert(dim, 2 * ffn)
        self.shared_gate = nn.Linear(dim, 1, bias=False)

    def forward(self, x_BSD):
        routed_BSD, _ = self.moe(x_BSD)
        shared_BSD = torch.sigmoid(self.shared_gate(x_BSD)) * self.shared_expert(x_BSD)
        return x_BSD + routed_BSD + shared_BSD


class MisroutedMoE(LoopMoE):
    """Malformed on purpose: expert e is applied to the rows routed to expert (e + 1) % E. Must fall back."""

    def forward(self, hidden_BSD):
        B, S, D = hidden_BSD.shape
        x_TD = hidden_BSD.view(-1, D)
        logits_TE, weights_TK, experts_TK = self.router(x_TD)
        out_TD = torch.zeros_like(x_TD)
        mask_EKT = F.one_hot(experts_TK, num_classes=self.num_experts).permute(2, 1, 0)
        for e in range(self.num_experts):
            k_idx, t_idx = torch.where(mask_EKT[(e + 1) % self.num_experts])
            rows = self.experts[e](x_TD[t_idx]) * weights_TK[t_idx, k_idx, None]
            out_TD.index_add_(0, t_idx, rows)
        return out_TD.view(B, S, D), logits_TE


class TinyTransformer(nn.Module):
    """Two blocks of (norm -> MoE -> residual), an embedding and a head: a model with several MoE blocks."""

    def __init__(self, vocab=64, dim=16, ffn=32, num_experts=4, top_k=2, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(layers)])
        self.moes = nn.ModuleList([LoopMoE(dim, ffn, num_experts, top_k) for _ in range(layers)])
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens_BS):
        h = self.embed(tokens_BS)
        for norm, moe in zip(self.norms, self.moes):
            h = h + moe(norm(h))[0]
        return self.head(h)


class DenseMLP(nn.Module):
    """No MoE at all: must compile exactly as stock Inductor does."""

    def __init__(self, dim=16, ffn=32):
        super().__init__()
        self.ffn = SwiGLUExpert(dim, ffn)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return x + self.ffn(self.norm(x))


def gshard_reference(model: LoopMoE, x_BSD: torch.Tensor, factor: float) -> torch.Tensor:
    """Eager MoE with GShard capacity: per expert, first choices of all tokens before second choices."""
    x = x_BSD.reshape(-1, x_BSD.shape[-1])
    _, weights, experts = model.router(x)
    T, K = experts.shape
    E = len(model.experts)
    capacity = math.ceil(factor * T * K / E)
    used = [0] * E
    out = torch.zeros_like(x)
    for k in range(K):
        for t in range(T):
            e = int(experts[t, k])
            if used[e] < capacity:
                used[e] += 1
                out[t] += weights[t, k] * model.experts[e](x[t:t + 1])[0]
    return out.view_as(x_BSD)
