"""MoESpec: what one MoE block is, in plain terms. Filled by detection, read by the rewrite and the report."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(kw_only=True, slots=True)
class RouterSpec:
    """How tokens choose experts. Descriptive: the rewrite keeps the user's router nodes as they are."""

    score: str  # "softmax" | "sigmoid" | "logits" (top-k straight on logits)
    top_k: int
    score_after_topk: bool = False  # softmax over the k selected logits (GPT-OSS, Granite)
    renormalize: bool = False
    selection_bias: bool = False  # a bias added for choosing experts only (DeepSeek-V3 correction bias)
    router_bias: bool = False  # the gate linear has a bias
    grouped: bool = False  # group-limited top-k (DeepSeek)
    scale: bool = False  # weights multiplied by a constant (routed_scaling_factor)


@dataclass(kw_only=True, slots=True)
class ExpertsSpec:
    """The expert FFN and where its weights live."""

    ffn: str  # "swiglu" | "geglu" | "mlp-gelu" | "mlp-relu" | ... (from the template's ops)
    weights: str  # "modulelist" | "stacked"
    path: str  # module path of the experts container ("experts", "mlp.experts", "" for the block itself)
    params: tuple[str, ...]  # parameter names within one expert (ModuleList) or of the stacked tensors
    layouts: tuple[str, ...] = ()  # per weight: "[O, I]" (y = x w^T) or "[I, O]"
    biases: bool = False


@dataclass(kw_only=True, slots=True)
class MoESpec:
    path: str  # module path of the MoE block ("" for a root module)
    form: str  # "loop" | "stacked-loop" | "dense-masked" | "sorted" | "grouped_mm" | "batched_mm"
    num_experts: int
    router: RouterSpec
    experts: ExpertsSpec | None = None
    shared_experts: tuple[str, ...] = ()  # module paths of shared experts inside the block
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        r = self.router
        bits = [f"E={self.num_experts}", f"k={r.top_k}", r.score + (" after top-k" if r.score_after_topk else "")]
        bits += [name for name, on in (("renorm", r.renormalize), ("sel-bias", r.selection_bias),
                                       ("gate-bias", r.router_bias), ("grouped", r.grouped), ("scaled", r.scale)) if on]
        if self.experts is not None:
            bits.append(f"{self.experts.ffn} ({self.experts.weights})")
        if self.shared_experts:
            bits.append("shared: " + ", ".join(self.shared_experts))
        return ", ".join(bits)
