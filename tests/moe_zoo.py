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


# Spellings of issue 13 (reach): the same block written other ways.


class GroupedMMMoE(nn.Module):
    """torch._grouped_mm over stacked [E, F, D] weights (torchtitan's GroupedExperts), argsort dispatch, offsets
    from the cumsum of per-expert counts, and a combine by ``scatter_add`` or ``index_add``.

    The GEMMs run in bf16 because Dynamo's fake ``_grouped_mm`` refuses fp32 on CPU; the block is fp32 outside.
    ``counts``: "histc", "bincount" or "onehot" (a bool routing map summed over tokens, torchtitan's).
    """

    def __init__(self, dim=16, ffn=32, num_experts=4, top_k=2, counts="histc", combine="scatter_add"):
        super().__init__()
        self.num_experts, self.top_k, self.counts, self.combine = num_experts, top_k, counts, combine
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.w1_EFD = nn.Parameter(torch.randn(num_experts, ffn, dim) / dim**0.5)
        self.w3_EFD = nn.Parameter(torch.randn(num_experts, ffn, dim) / dim**0.5)
        self.w2_EDF = nn.Parameter(torch.randn(num_experts, dim, ffn) / ffn**0.5)

    def _counts_E(self, experts_TK, scores_TE):
        flat_N = experts_TK.reshape(-1)
        if self.counts == "histc":
            return torch.histc(flat_N.float(), bins=self.num_experts, min=0, max=self.num_experts - 1)
        if self.counts == "bincount":
            counts_E = torch.bincount(flat_N, minlength=self.num_experts)
            torch._check(counts_E.size(0) == self.num_experts)
            return counts_E
        return torch.zeros_like(scores_TE, dtype=torch.bool).scatter_(-1, experts_TK, True).sum(0)

    def forward(self, x_TD):
        T, D = x_TD.shape
        scores_TE = F.softmax(self.gate(x_TD), dim=-1)
        weights_TK, experts_TK = torch.topk(scores_TE, self.top_k, dim=-1)
        offsets_E = torch.cumsum(self._counts_E(experts_TK, scores_TE), dim=0, dtype=torch.int32)
        order_N = torch.argsort(experts_TK.view(-1), stable=True)
        weights_N = weights_TK.view(-1)[order_N]
        token_N = order_N // self.top_k
        x_ND = x_TD[token_N].bfloat16()
        h_NF = F.silu(torch._grouped_mm(x_ND, self.w1_EFD.bfloat16().transpose(-2, -1), offs=offsets_E))
        h_NF = h_NF * torch._grouped_mm(x_ND, self.w3_EFD.bfloat16().transpose(-2, -1), offs=offsets_E)
        y_ND = torch._grouped_mm(h_NF, self.w2_EDF.bfloat16().transpose(-2, -1), offs=offsets_E).type_as(x_TD)
        y_ND = y_ND * weights_N.unsqueeze(-1)
        out_TD = torch.zeros_like(x_TD)
        if self.combine == "scatter_add":
            return out_TD.scatter_add(0, token_N.view(-1, 1).expand(-1, D), y_ND)
        return out_TD.index_add(0, token_N, y_ND)


class DenseArgmaxMoE(nn.Module):
    """Dense-masked top-1 chosen with ``max`` (or ``argmax`` and a gather) instead of ``topk``: every expert runs
    on every token, and a one-hot gate matrix keeps the chosen one (Switch-style routing, no capacity)."""

    def __init__(self, dim=16, ffn=32, num_experts=4, select="max"):
        super().__init__()
        self.num_experts, self.select = num_experts, select
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleList([SwiGLUExpert(dim, ffn) for _ in range(num_experts)])

    def forward(self, x_TD):
        probs_TE = F.softmax(self.gate(x_TD), dim=-1)
        if self.select == "max":
            weight_T, expert_T = probs_TE.max(dim=-1)
        else:
            expert_T = torch.argmax(probs_TE, dim=-1)
            weight_T = probs_TE.gather(-1, expert_T.unsqueeze(-1)).squeeze(-1)
        gates_TE = F.one_hot(expert_T, self.num_experts).to(x_TD.dtype) * weight_T.unsqueeze(-1)
        return sum(gates_TE[:, e:e + 1] * expert(x_TD) for e, expert in enumerate(self.experts))


class LoopCombineMoE(LoopMoE):
    """(a) with the combine spelled ``scatter_add_`` or ``index_put_(accumulate=True)`` instead of ``index_add_``,
    and optionally the empty-expert skip many hand-written layers have (``if t_idx.numel() == 0: continue``)."""

    def __init__(self, combine="scatter_add", skip_empty=False, **kwargs):
        super().__init__(**kwargs)
        self.combine, self.skip_empty = combine, skip_empty

    def forward(self, hidden_BSD):
        B, S, D = hidden_BSD.shape
        x_TD = hidden_BSD.view(-1, D)
        logits_TE, weights_TK, experts_TK = self.router(x_TD)
        out_TD = torch.zeros_like(x_TD)
        mask_EKT = F.one_hot(experts_TK, num_classes=self.num_experts).permute(2, 1, 0)
        for e in range(self.num_experts):
            k_idx, t_idx = torch.where(mask_EKT[e])
            if self.skip_empty and t_idx.numel() == 0:
                continue
            rows = self.experts[e](x_TD[t_idx]) * weights_TK[t_idx, k_idx, None]
            if self.combine == "scatter_add":
                out_TD.scatter_add_(0, t_idx.unsqueeze(-1).expand(-1, D), rows)
            else:
                out_TD.index_put_((t_idx,), rows, accumulate=True)
        return out_TD.view(B, S, D), logits_TE


class CrossTalkMoE(LoopMoE):
    """Malformed on purpose: expert e > 0 reads expert e-1's output as well as its rows. Must not be rewritten,
    and the report must say so (a near miss)."""

    def forward(self, hidden_BSD):
        B, S, D = hidden_BSD.shape
        x_TD = hidden_BSD.view(-1, D)
        logits_TE, weights_TK, experts_TK = self.router(x_TD)
        out_TD = torch.zeros_like(x_TD)
        prev_D = torch.zeros(D)
        for e in range(self.num_experts):
            t_idx, k_idx = torch.where(experts_TK == e)
            y = self.experts[e](x_TD[t_idx] + prev_D)
            prev_D = y.mean(0) if e == 0 else prev_D
            out_TD.index_add_(0, t_idx, y * weights_TK[t_idx, k_idx, None])
        return out_TD.view(B, S, D), logits_TE


class GShardEinsumMoE(nn.Module):
    """GShard / Switch top-1 with the capacity computed in the block and einsum dispatch and combine masks
    ``[T, E, C]`` (Mesh-TensorFlow / DeepSpeed ``top1gating``): a token past its expert's C slots is dropped."""

    def __init__(self, dim=16, ffn=32, num_experts=4, capacity_factor=1.0):
        super().__init__()
        self.num_experts, self.capacity_factor = num_experts, capacity_factor
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.wi_EDF = nn.Parameter(torch.randn(num_experts, dim, ffn) / dim**0.5)
        self.wo_EFD = nn.Parameter(torch.randn(num_experts, ffn, dim) / ffn**0.5)

    def forward(self, x_TD):
        T, E = x_TD.shape[0], self.num_experts
        capacity = math.ceil(self.capacity_factor * T / E)
        probs_TE = F.softmax(self.gate(x_TD), dim=-1)
        expert_T = torch.argmax(probs_TE, dim=-1)
        mask_TE = F.one_hot(expert_T, E)
        position_TE = torch.cumsum(mask_TE, dim=0) * mask_TE - 1
        mask_TE = mask_TE * (position_TE < capacity)
        gate_T = (probs_TE * mask_TE).sum(-1)
        slot_TC = F.one_hot((position_TE * mask_TE).sum(-1).clamp(min=0), capacity)
        dispatch_TEC = mask_TE.unsqueeze(-1).to(x_TD.dtype) * slot_TC.unsqueeze(1).to(x_TD.dtype)
        combine_TEC = gate_T[:, None, None] * dispatch_TEC
        x_ECD = torch.einsum("tec,td->ecd", dispatch_TEC, x_TD)
        h_ECF = F.relu(torch.einsum("ecd,edf->ecf", x_ECD, self.wi_EDF))
        y_ECD = torch.einsum("ecf,efd->ecd", h_ECF, self.wo_EFD)
        return torch.einsum("tec,ecd->td", combine_TEC, y_ECD)


class BrokenRouterMoE(LoopMoE):
    """A graph break between the router and the experts: the router's graph has no experts in it."""

    def forward(self, hidden_BSD):
        x_TD = hidden_BSD.reshape(-1, hidden_BSD.shape[-1])
        _, weights_TK, experts_TK = self.router(x_TD)
        torch._dynamo.graph_break()
        out_TD = torch.zeros_like(x_TD)
        for e in range(self.num_experts):
            t_idx, k_idx = torch.where(experts_TK == e)
            out_TD.index_add_(0, t_idx, self.experts[e](x_TD[t_idx]) * weights_TK[t_idx, k_idx, None])
        return out_TD.view_as(hidden_BSD)
