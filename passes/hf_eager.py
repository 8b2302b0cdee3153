"""HF transformers "eager" experts: traceable equivalents that Dynamo uses instead of the loop over hit experts.

transformers' eager experts loop over ``expert_hit = (...).nonzero()``; Dynamo breaks the graph at ``nonzero`` and
again at ``for expert_idx in expert_hit``, then skips the resumed frame, so the expert computation never reaches a
backend. Each function below computes exactly what one experts ``forward`` text computes, looping over
``range(num_experts)`` instead of over the hit experts: an expert that received no rows adds an empty
``index_add_`` (a no-op), and the hit experts run the same ops in the same (ascending) order, so the result is the
same to the last bit. Under moecc's capture flags the loop traces into one graph, where the MoE pass finds it.

Which classes are substituted is decided by their source text: a class is substituted only if the AST of its
undecorated ``forward`` has the fingerprint of a text we wrote an equivalent for (the fingerprints below are those
of transformers 5.23.0). A changed text is left alone (it graph-breaks as before; never a wrong substitution).

Substitutions are process-global in Dynamo, so :func:`substitutions` registers them only while a frame is being
traced for the moecc backend (``moecc/capture.py`` enters it) and removes them afterwards: other backends in the
same process see HF's code untouched.
"""
from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import inspect
import sys
import textwrap
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import empty_skip


def mixtral_template_forward(self, hidden_states, top_k_index, top_k_weights):
    """The experts forward shared by 54 families (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, ...).

    Stacked ``gate_up_proj [E, 2F, H]`` (gate then up) and ``down_proj [E, H, F]``; ids equal to ``num_experts``
    (expert-parallel sentinels) are skipped as in HF, by never being visited.
    """
    final_hidden_states = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
    for expert_idx in range(self.num_experts):
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        current_state = hidden_states[token_idx]
        gate, up = F.linear(current_state, self.gate_up_proj[expert_idx]).chunk(2, dim=-1)
        current_hidden_states = self.act_fn(gate) * up
        current_hidden_states = F.linear(current_hidden_states, self.down_proj[expert_idx])
        current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
        final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))
    return final_hidden_states


def gpt_oss_forward(self, hidden_states, router_indices=None, routing_weights=None):
    """GPT-OSS: transposed ``[E, H, 2F]`` weights with biases, the clamped SwiGLU of ``self._apply_gate``."""
    next_states = torch.zeros_like(hidden_states, dtype=hidden_states.dtype, device=hidden_states.device)
    with torch.no_grad():
        expert_mask = F.one_hot(router_indices, num_classes=self.num_experts).permute(2, 1, 0)
    for expert_idx in range(self.num_experts):
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        current_state = hidden_states[token_idx]
        gate_up = current_state @ self.gate_up_proj[expert_idx] + self.gate_up_proj_bias[expert_idx]
        gated_output = self._apply_gate(gate_up)
        out = gated_output @ self.down_proj[expert_idx] + self.down_proj_bias[expert_idx]
        weighted_output = out * routing_weights[token_idx, top_k_pos, None]
        next_states.index_add_(0, token_idx, weighted_output.to(hidden_states.dtype))
    return next_states


def switch_forward(self, hidden_states, selected_experts, routing_weights):
    """Switch Transformers: top-1 with capacity; ``selected_experts [T, 1, E]`` is the router's one-hot dispatch
    mask with tokens past their expert's capacity zeroed, ``routing_weights [T, 1]`` the top probability.

    A dropped token is in no expert's rows, so its routed output is 0. We fold that into its weight: ``weight_T =
    routing_weights * (number of experts the mask keeps for the token)``, which is the probability itself (times
    1.0, exact) for a kept token and 0 for a dropped one, and read each row's weight from it. The sum is the same,
    and the weight alone now says what the mask says, so the slot rewrite (expert = argmax, weight = weight_T)
    reproduces the capacity exactly.
    """
    final_hidden_states = torch.zeros_like(hidden_states)
    expert_mask = selected_experts.permute(2, 1, 0)
    weight_T = (routing_weights * selected_experts.sum(dim=-1).to(routing_weights.dtype)).reshape(-1)
    for expert_idx in range(self.num_experts):
        idx, top_x = torch.where(expert_mask[expert_idx])
        current_state = hidden_states[None, top_x].reshape(-1, hidden_states.shape[-1])
        current_hidden_states = self[f"expert_{expert_idx}"](current_state) * weight_T[top_x, None]
        final_hidden_states.index_add_(0, top_x, current_hidden_states.to(hidden_states.dtype))
    return final_hidden_states


def gated_template_forward(self, hidden_states, top_k_index, top_k_weights):
    """The Mixtral text with the gate computed by ``self._apply_gate`` (clamped SwiGLU): Step3p7, Beam,
    DeepSeek-V4, GLM-5-Next, HY-V4 (and its VL model), MiniMax-M3-VL."""
    final = torch.zeros_like(hidden_states)
    with torch.no_grad():
        mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
    for expert_idx in range(self.num_experts):
        top_k_pos, token_idx = torch.where(mask[expert_idx])
        current = self._apply_gate(F.linear(hidden_states[token_idx], self.gate_up_proj[expert_idx]))
        current = F.linear(current, self.down_proj[expert_idx]) * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, current.to(final.dtype))
    return final


def gated_fp32_forward(self, hidden_states, top_k_index, top_k_weights):
    """Inkling2 (and its loop model): the gated text accumulated in fp32, cast back at the end."""
    final_hidden_states = torch.zeros_like(hidden_states, dtype=torch.float32)
    with torch.no_grad():
        expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
    for expert_idx in range(self.num_experts):
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        current_state = hidden_states[token_idx]
        current_hidden_states = self._apply_gate(F.linear(current_state, self.gate_up_proj[expert_idx]))
        current_hidden_states = F.linear(current_hidden_states, self.down_proj[expert_idx])
        current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
        final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))
    return final_hidden_states.to(hidden_states.dtype)


def post_norm_forward(self, hidden_states, top_k_index, top_k_weights):
    """MuseSpark: the Mixtral text with ``self.post_expert_norm`` on each expert's output before its weight."""
    final_hidden_states = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
    for expert_idx in range(self.num_experts):
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        current_state = hidden_states[token_idx]
        gate, up = F.linear(current_state, self.gate_up_proj[expert_idx]).chunk(2, dim=-1)
        current_hidden_states = self.act_fn(gate) * up
        current_hidden_states = F.linear(current_hidden_states, self.down_proj[expert_idx])
        current_hidden_states = self.post_expert_norm(current_hidden_states)
        current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
        final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))
    return final_hidden_states


def matmul_template_forward(self, hidden_states, top_k_index, top_k_weights):
    """Aria: the Mixtral text with ``@`` over ``gate_up_proj [E, H, 2F]`` and ``down_proj [E, F, H]``."""
    final_hidden_states = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
    for expert_idx in range(self.num_experts):
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        current_state = hidden_states[token_idx]
        gate, up = (current_state @ self.gate_up_proj[expert_idx]).chunk(2, dim=-1)
        current_hidden_states = self.act_fn(gate) * up
        current_hidden_states = current_hidden_states @ self.down_proj[expert_idx]
        current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
        final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))
    return final_hidden_states


def ungated_forward(self, hidden_states, top_k_index, top_k_weights):
    """Nemotron-H: ``down_proj(act(up_proj(x)))`` per expert, accumulated in the routing weights' dtype (an expert
    with no rows is skipped in HF and adds an empty ``index_add_`` here: the same)."""
    final_hidden_states = torch.zeros_like(hidden_states, dtype=top_k_weights.dtype)
    with torch.no_grad():
        expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
    for expert_idx in range(self.num_experts):
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        current_state = hidden_states[token_idx]
        current_hidden_states = F.linear(current_state, self.up_proj[expert_idx])
        current_hidden_states = self.act_fn(current_hidden_states)
        current_hidden_states = F.linear(current_hidden_states, self.down_proj[expert_idx])
        current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
        final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))
    return final_hidden_states.to(hidden_states.dtype)


def gpt_oss_fp32_forward(self, hidden_states, router_indices=None, routing_weights=None):
    """OpenAI privacy filter: the GPT-OSS text with every product and the accumulation in fp32."""
    original_dtype = hidden_states.dtype
    next_states = torch.zeros_like(hidden_states, dtype=torch.float32, device=hidden_states.device)
    with torch.no_grad():
        expert_mask = F.one_hot(router_indices, num_classes=self.num_experts).permute(2, 1, 0)
    for expert_idx in range(self.num_experts):
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        current_state = hidden_states[token_idx]
        gate_up = (current_state.float() @ self.gate_up_proj[expert_idx].float()
                   + self.gate_up_proj_bias[expert_idx].float())
        gated_output = self._apply_gate(gate_up).float()
        out = gated_output.float() @ self.down_proj[expert_idx].float() + self.down_proj_bias[expert_idx].float()
        weighted_output = out * routing_weights[token_idx, top_k_pos, None].float()
        next_states.index_add_(0, token_idx, weighted_output)
    return next_states.to(original_dtype)


def nllb_forward(self, hidden_states, router_mask, router_probs):
    """NLLB-MoE: ModuleDict ``expert_<i>`` of dense FFNs, top-2 ids ``router_mask [T, k]`` and their
    probabilities (zero for a token past its expert's capacity), the token dropout of ``moe_token_dropout``."""
    final_hidden_states = torch.zeros_like(hidden_states)
    expert_mask = F.one_hot(router_mask, num_classes=self.num_experts).permute(2, 1, 0)
    for expert_idx in range(self.num_experts):
        idx, top_x = torch.where(expert_mask[expert_idx])
        current_state = hidden_states[None, top_x].reshape(-1, hidden_states.shape[-1])
        current_hidden_states = self[f"expert_{expert_idx}"](current_state) * router_probs[top_x, idx, None]
        if self.moe_token_dropout > 0:
            if self.training:
                current_hidden_states = self.token_dropout(current_hidden_states)
            else:
                current_hidden_states *= 1 - self.moe_token_dropout
        final_hidden_states.index_add_(0, top_x, current_hidden_states.to(hidden_states.dtype))
    return final_hidden_states


# AST fingerprint of an experts ``forward`` text -> (who has it, its traceable equivalent). The first three are
# those of transformers 5.23.0; the others were read off 5.24.0.
EQUIVALENTS: dict[str, tuple[str, Callable]] = {
    "1369e7d0ba6f": ("MixtralExperts and 53 other families", mixtral_template_forward),
    "646c9a88c160": ("GptOssExperts", gpt_oss_forward),
    "48e2baadb5c6": ("SwitchTransformersExperts", switch_forward),
    "c6ce569f742f": ("Step3p7Experts and 6 other families", gated_template_forward),
    "ef4ba363b473": ("Inkling2Experts, Inkling2LoopExperts", gated_fp32_forward),
    "8180748fd664": ("MuseSparkExperts", post_norm_forward),
    "fac4eceee11e": ("AriaExperts", matmul_template_forward),
    "f63522dddeaf": ("NemotronHExperts", ungated_forward),
    "71f78c97dd0c": ("OpenAIPrivacyFilterExperts", gpt_oss_fp32_forward),
    "77f5c979ebb1": ("NllbMoeExperts", nllb_forward),
}


def fingerprint(fn: Callable) -> str | None:
    """A short hash of the function's body as an AST (formatting, comments and decorators do not count)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return None
    body = ast.dump(ast.Module(body=tree.body, type_ignores=[]))
    return hashlib.sha1(body.encode()).hexdigest()[:12]


def eager_forward(cls: type) -> Callable:
    """The class's own eager forward: under ``@use_experts_implementation`` it is the wrapped one."""
    return getattr(cls.forward, "__wrapped__", cls.forward)


def _delegate(cls: type) -> None:
    """Make an undecorated experts ``forward`` (Switch) reach Dynamo through a call it can substitute.

    Dynamo inlines a module's own ``forward`` without looking for substitutions; it looks for them when a
    function is called from traced code. HF's ``@use_experts_implementation`` already calls the eager forward
    that way; for a class without it we install the same thin wrapper once: it calls the original forward with
    the same arguments, so eager behaviour is unchanged, and other backends still trace the original.
    """
    if hasattr(cls.forward, "__wrapped__"):
        return
    original = cls.forward

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        return original(self, *args, **kwargs)

    cls.forward = forward


_found: dict[type, Callable | None] = {}


def experts_classes() -> dict[Callable, Callable]:
    """Undecorated eager forward -> traceable equivalent, for every loaded transformers experts class we cover."""
    out = {}
    for name, module in list(sys.modules.items()):
        if not name.startswith("transformers.models.") or ".modeling_" not in name or module is None:
            continue
        for cls in list(vars(module).values()):
            if not (isinstance(cls, type) and cls.__name__.endswith("Experts") and cls.__module__ == name):
                continue
            if cls not in _found:
                match = EQUIVALENTS.get(fingerprint(eager_forward(cls)) or "")
                _found[cls] = match[1] if match else None
            if _found[cls] is not None:
                _delegate(cls)
                out[eager_forward(cls)] = _found[cls]
    return out


def _register(original: Callable, traceable: Callable) -> Callable[[], None]:
    """``torch.compiler.substitute_in_graph(original)(traceable)``, and a function that undoes it.

    torch has no public way to remove a substitution; it records one in four registries (see
    ``torch/_dynamo/decorators.py``), and the undo removes exactly the entries it added.
    """
    from torch._dynamo.trace_rules import _polyfilled_function_ids, get_torch_obj_rule_map
    from torch._dynamo.variables import PolyfilledFunctionVariable
    from torch._dynamo.variables.builder import VariableBuilder

    # The signature check (parameter names and defaults) stays on: the body fingerprint does not cover them.
    wrapped = torch.compiler.substitute_in_graph(original)(traceable)
    keys = (original, wrapped)

    def undo() -> None:
        id_dispatch = VariableBuilder._id_dispatch()
        rules = get_torch_obj_rule_map()
        handlers = PolyfilledFunctionVariable._get_polyfill_handlers()
        for k in keys:
            id_dispatch.pop(id(k), None)
            _polyfilled_function_ids.remove(id(k))
            rules.pop(k, None)
            handlers.pop(k, None)

    return undo


_depth = 0
_undo: list[Callable[[], None]] = []


@contextlib.contextmanager
def substitutions():
    """Dynamo traces the covered HF eager experts through their equivalents while this is entered (re-entrant)."""
    global _depth
    if _depth == 0:
        for original, traceable in experts_classes().items():
            try:
                _undo.append(_register(original, traceable))
            except (TypeError, ValueError):  # another signature, or substituted by someone else: leave it
                continue
    _depth += 1
    try:
        with empty_skip.assume_nonempty():  # the other trace-time rule of moecc's frames (see empty_skip.py)
            yield
    finally:
        _depth -= 1
        if _depth == 0:
            while _undo:
                _undo.pop()()


def active() -> bool:
    """True while the substitutions are registered (inside a moecc trace)."""
    return _depth > 0
