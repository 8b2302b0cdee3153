"""Hugging Face transformers 5.x MoE families, built from their config classes (no downloads), tiny or bench size.

``build(family, impl, size)`` returns ``(model, make_input)``: a module whose forward takes one tensor of token ids
and returns a tensor (logits), and a function giving a fresh batch of token ids. ``impl`` is the experts
implementation ("eager" or "grouped_mm"); Switch Transformers has only its own eager loop, so it takes "eager".
Sizes: "tiny" for tests (hidden 16, ffn 32, 4 experts, top-2, 2 layers), "bench" for benchmarks/hf_families.py
(hidden 512, ffn 1024, 8 experts, top-2, 2 layers). Dropout and router jitter are off so training is
deterministic and comparable with eager.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss", "switch")
IMPLS = {family: ("eager", "grouped_mm") for family in FAMILIES} | {"switch": ("eager",)}
SIZES = {
    "tiny": dict(hidden=16, ffn=32, experts=4, top_k=2, layers=2, heads=2, vocab=64, batch=2, seq=6),
    "bench": dict(hidden=512, ffn=1024, experts=8, top_k=2, layers=2, heads=8, vocab=1024, batch=4, seq=512),
}


class Logits(torch.nn.Module):
    """``model(tokens).logits`` as a module: one tensor in, one tensor out (decoder-only families)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens):
        return self.model(tokens, use_cache=False).logits


class Seq2SeqLogits(torch.nn.Module):
    """Encoder-decoder logits with the decoder fed the same tokens (Switch Transformers).

    The attention mask is passed explicitly: without one, the Switch encoder builds it only when not compiling
    (``if attention_mask is None and not is_torchdynamo_compiling()``) and then indexes ``None``, which Dynamo
    turns into a graph break at the top of the model.
    """

    def __init__(self, model, output: str = "logits"):
        super().__init__()
        self.model = model
        self.output = output  # "last_hidden_state" for a base model without an LM head (NLLB-MoE)

    def forward(self, tokens):
        mask = torch.ones_like(tokens)
        out = self.model(input_ids=tokens, attention_mask=mask, decoder_input_ids=tokens,
                         decoder_attention_mask=mask, use_cache=False)
        return getattr(out, self.output)


def _config(family: str, s: dict):
    import transformers as T

    h, f, e, k, n, heads, v = s["hidden"], s["ffn"], s["experts"], s["top_k"], s["layers"], s["heads"], s["vocab"]
    common = dict(vocab_size=v, hidden_size=h, num_hidden_layers=n, num_attention_heads=heads,
                  num_key_value_heads=heads, max_position_embeddings=2 * s["seq"] + 64)
    if family == "mixtral":
        return T.MixtralConfig(**common, intermediate_size=f, num_local_experts=e, num_experts_per_tok=k)
    if family == "qwen2_moe":  # shared expert behind its own sigmoid gate
        return T.Qwen2MoeConfig(**common, intermediate_size=f, moe_intermediate_size=f,
                                shared_expert_intermediate_size=f, num_experts=e, num_experts_per_tok=k,
                                norm_topk_prob=False)
    if family == "qwen3_moe":
        return T.Qwen3MoeConfig(**common, intermediate_size=f, moe_intermediate_size=f, num_experts=e,
                                num_experts_per_tok=k, norm_topk_prob=True, head_dim=h // heads)
    if family == "olmoe":  # no renormalisation
        return T.OlmoeConfig(**common, intermediate_size=f, num_experts=e, num_experts_per_tok=k,
                             norm_topk_prob=False, eos_token_id=v - 1, pad_token_id=0)
    if family in ("deepseek_v2", "deepseek_v3"):
        mla = dict(kv_lora_rank=h // 2, q_lora_rank=h // 2, qk_rope_head_dim=h // heads // 2,
                   qk_nope_head_dim=h // heads // 2, v_head_dim=h // heads, head_dim=h // heads // 2)
        moe = dict(intermediate_size=f, moe_intermediate_size=f, n_routed_experts=e, num_experts_per_tok=k,
                   n_shared_experts=1, first_k_dense_replace=0, n_group=2, topk_group=1,
                   routed_scaling_factor=2.5)
        if family == "deepseek_v2":  # softmax scores, group-limited greedy (group max), scaled, no renorm
            return T.DeepseekV2Config(**common, **mla, **moe, topk_method="group_limited_greedy")
        # sigmoid scores + correction bias for selection, group-limited (top-2 sum), renorm, scaled
        return T.DeepseekV3Config(**common, **mla, **moe, norm_topk_prob=True)
    if family == "gpt_oss":
        return T.GptOssConfig(**common, intermediate_size=f, num_local_experts=e, num_experts_per_tok=k,
                              head_dim=h // heads, layer_types=["full_attention"] * n, sliding_window=128,
                              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if family == "switch":
        return T.SwitchTransformersConfig(vocab_size=v, d_model=h, d_kv=h // heads, d_ff=f, num_heads=heads,
                                          num_layers=n, num_decoder_layers=n, num_sparse_encoder_layers=n,
                                          num_sparse_decoder_layers=n, num_experts=e,
                                          expert_capacity=max(1, (s["batch"] * s["seq"]) // e // 2 + 1),
                                          router_jitter_noise=0.0, dropout_rate=0.0, decoder_start_token_id=0)
    raise KeyError(family)


def build(family: str, impl: str = "eager", size: str = "tiny", seed: int = 0):
    """(module returning logits from token ids, function returning a batch of token ids)."""
    import transformers as T

    if impl not in IMPLS[family]:
        raise ValueError(f"{family} has no experts implementation {impl!r}")
    s = SIZES[size]
    config = _config(family, s)
    config._attn_implementation = "eager"  # GPT-OSS and Switch need it; the same for all keeps rows comparable
    if family != "switch":
        config._experts_implementation = impl
    torch.manual_seed(seed)
    if family == "switch":
        model = Seq2SeqLogits(T.SwitchTransformersForConditionalGeneration(config))
    else:
        model = Logits(T.AutoModelForCausalLM.from_config(config))
    _spread_router_biases(model)
    model.train(False)
    gen = torch.Generator().manual_seed(seed + 1)

    def make_input():
        return torch.randint(1, s["vocab"], (s["batch"], s["seq"]), generator=gen)

    return model, make_input


def _spread_router_biases(model: torch.nn.Module) -> None:
    """Give zero-initialised router parameters (GPT-OSS router, DeepSeek-V3 correction bias) distinct values.

    HF initialises them to zeros; zeros would hide a rewrite that ignores them (a selection bias that is not
    applied gives the same experts when it is all zeros).
    """
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith(("e_score_correction_bias", "router.weight", "router.bias")) \
                    or (name.endswith("gate.weight") and "deepseek" in type(model.model).__name__.lower()):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.5)
            elif name.endswith(("gate_up_proj_bias", "down_proj_bias")):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.1)


def moe_blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(path, module) of every MoE block of a model built by :func:`build`: the module holding router and experts."""
    return [(name, mod) for name, mod in model.named_modules()
            if hasattr(mod, "experts") and any(hasattr(mod, r) for r in ("gate", "router"))]


class Compiled:
    """One model compiled with moecc, trained one step beside its eager twin: what the family tests read."""

    def __init__(self, family: str, impl: str, size: str = "tiny"):
        import copy

        from torch._dynamo.utils import counters

        import moecc

        self.model, self.make_input = build(family, impl, size)
        self.model.train(True)  # training graph: dropout and jitter are 0, so it still equals eager
        self.twin = copy.deepcopy(self.model)
        torch._dynamo.reset()
        counters.clear()
        self.compiled = torch.compile(self.model, backend="moecc")
        tokens = self.make_input()
        self.out, self.ref = self.compiled(tokens), self.twin(tokens)
        self.graphs = counters["stats"]["unique_graphs"]
        self.breaks = sum(counters["graph_break"].values())
        self.records = moecc.report(self.model).blocks
        cotangent = torch.randn(self.ref.shape, generator=torch.Generator().manual_seed(3))
        (self.out * cotangent).sum().backward()
        (self.ref * cotangent).sum().backward()

    def grads(self):
        """(name, moecc gradient, eager gradient) for every parameter."""
        return [(name, p.grad, q.grad) for (name, p), q in zip(self.model.named_parameters(), self.twin.parameters())]


def router_facts(spec) -> dict:
    """The family-agnostic router facts of a block's spec, as a dict (what the report shows)."""
    r = spec.router
    return dict(score=r.score, top_k=r.top_k, score_after_topk=r.score_after_topk, renormalize=r.renormalize,
                selection_bias=r.selection_bias, router_bias=r.router_bias, grouped=r.grouped, scale=r.scale)


def block_fullgraph(family: str, impl: str):
    """Compile the first MoE block of a tiny ``family`` model alone with ``fullgraph=True`` (a graph break inside
    the block fails the compile), run forward and backward beside eager.

    Returns (report records, [(what, moecc value, eager value)] for the output and every gradient).
    """
    import copy

    import moecc

    model, _ = build(family, impl)
    _, block = moe_blocks(model)[0]
    block.train(True)
    twin = copy.deepcopy(block)
    width = next(p for n, p in block.named_parameters() if "router" in n or "gate" in n).shape[-1]
    x = torch.randn(2, 6, width, generator=torch.Generator().manual_seed(5))
    x_ref = x.clone().requires_grad_(True)
    x = x.requires_grad_(True)
    torch._dynamo.reset()
    out, ref = torch.compile(block, backend="moecc", fullgraph=True)(x), twin(x_ref)
    out, ref = (out[0], ref[0]) if isinstance(out, tuple) else (out, ref)
    records = moecc.report(block).blocks
    cotangent = torch.randn(ref.shape, generator=torch.Generator().manual_seed(6))
    (out * cotangent).sum().backward()
    (ref * cotangent).sum().backward()
    pairs = [("output", out, ref), ("input grad", x.grad, x_ref.grad)]
    pairs += [(name, p.grad, q.grad) for (name, p), q in zip(block.named_parameters(), twin.parameters())]
    return records, pairs


def assert_pairs_close(pairs, atol=1e-5, rtol=1e-4) -> None:
    for what, ours, ref in pairs:
        if ref is None:
            assert ours is None or not ours.abs().any(), what
        else:
            torch.testing.assert_close(ours, ref, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


@dataclass(frozen=True)
class Family:
    """What the report must say of every MoE block of a decoder-only HF family at tiny size."""

    name: str
    router: dict
    ffn: str
    layouts: tuple[str, ...]
    shared: tuple[str, ...] = ()
    paths: tuple[str, ...] = ("model.model.layers.0.mlp", "model.model.layers.1.mlp")


def assert_blocks_report_family(records, family: Family) -> None:
    """Every block found, rewritten, and described with the family's router, FFN, weights and shared experts."""
    assert [r.spec.path for r in records] == list(family.paths)
    assert all(r.rewritten for r in records), [r.outcome for r in records]
    for r in records:
        assert r.spec.form == "stacked-loop" and r.spec.num_experts == 4
        assert router_facts(r.spec) == family.router
        assert (r.spec.experts.ffn, r.spec.experts.weights) == (family.ffn, "stacked")
        assert r.spec.shared_experts == family.shared
        assert list(r.spec.experts.layouts) == list(family.layouts)


def assert_grouped_mm_block_equals_eager(family: Family) -> None:
    """One block with the grouped_mm experts, compiled alone with fullgraph=True: rewritten and equal to eager."""
    records, pairs = block_fullgraph(family.name, "grouped_mm")
    assert len(records) == 1 and records[0].rewritten, [r.outcome for r in records]
    assert records[0].spec.form == "grouped_mm" and router_facts(records[0].spec) == family.router
    assert_pairs_close(pairs)


def assert_whole_grouped_mm_model_equals_eager(family: Family) -> None:
    c = Compiled(family.name, "grouped_mm")
    assert [r.spec.path for r in c.records] == list(family.paths) and all(r.rewritten for r in c.records)
    assert (c.graphs, c.breaks) == (1, 0)
    assert_pairs_close([("logits", c.out, c.ref), *c.grads()])


# Every MoE family transformers ships (issue 13, item 5): built generically from its config class at tiny size.
ALL_FAMILIES = tuple(sorted((
    "afmoe aria axk1 axk2 bailing_hybrid beam cohere2_moe dbrx deepseek_ocr2 deepseek_v2 deepseek_v3 deepseek_v32 "
    "deepseek_v4 diffusion_gemma dots1 dots3_note ernie4_5_moe ernie4_5_vl_moe exaone_moe flex_olmo flint gemma4 "
    "glm4_moe glm4_moe_lite glm4v_moe glm5_next glm_moe_dsa gpt_oss granitemoe granitemoe_swa granitemoehybrid "
    "granitemoeshared hunyuan_v1_moe hy_v3 hy_v4 hy_v4_vl inkling inkling2 inkling2_loop jamba jetmoe kimi_linear "
    "kolibri1 laguna lara_mini lfm2_moe llama4 longcat_flash mellum mimo_v2_flash minimax minimax_m2 minimax_m3_vl "
    "mistral4 mistral_large4 mixtral muse_spark nemotron_h nllb_moe olmoe openai_privacy_filter phimoe qwen2_moe "
    "qwen3_5_moe qwen3_moe qwen3_next qwen3_omni_moe qwen3_vl_moe qwen4_exp solar_open step3p7 "
    "switch_transformers unlimited_ocr zaya").split()))

# Tiny values for the config fields families share (a field a config does not have is left out).
_TINY_FIELDS = dict(
    vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=32, shared_expert_intermediate_size=32,
    expert_intermediate_size=32, ffn_hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=2, head_dim=8, num_experts=4, num_local_experts=4, n_routed_experts=4, moe_num_experts=4,
    num_experts_per_tok=2, moe_k=2, moe_topk=2, top_k=2, top_k_experts=2, n_shared_experts=1, n_group=2, topk_group=1,
    first_k_dense_replace=0, kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
    max_position_embeddings=128, router_jitter_noise=0.0, attention_dropout=0.0, hidden_dropout=0.0,
    mlp_only_layers=[], decoder_sparse_step=1, moe_layer_freq=1, num_dense_layers=0,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, enable_moe_block=True,
)
_CONFIG_KEYS = {"nllb_moe": "nllb-moe"}  # model types spelled otherwise than their folder
# Families whose first layers are dense (or hash-routed) by default: at two layers they would have no MoE block.
# The others: fields their validators tie to the tiny sizes above, or sub-configs the shared fields do not reach.
_ROPE = dict(rope_type="default", rope_theta=10000.0)
_FAMILY_FIELDS = {
    "beam": dict(mlp_layer_types=["sparse", "sparse"]),
    "deepseek_v4": dict(mlp_layer_types=["hash_moe", "moe"]),
    # its own field names; attention and experts are sub-configs (RoPE theta and clip_qkv must be set)
    "dbrx": dict(d_model=16, n_heads=2, n_layers=2, max_seq_len=128, vocab_size=64,
                 attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                 ffn_config=dict(ffn_hidden_size=32, moe_num_experts=4, moe_top_k=2)),
    "deepseek_ocr2": dict(mlp_layer_types=["sparse", "sparse"]),  # no default: every layer indexes it
    # multimodal RoPE: the sections must sum to the rotary half-width (head_dim 8, half of it rotary in GLM-4V)
    "ernie4_5_vl_moe": dict(rope_parameters={**_ROPE, "mrope_section": [1, 1, 2]}),
    "glm4v_moe": dict(rope_parameters={**_ROPE, "partial_rotary_factor": 0.5, "mrope_section": [1, 1, 0]}),
    "hy_v4_vl": dict(qk_rope_head_dim=4, rope_parameters={**_ROPE, "mrope_section": [1, 1, 0]}),
    # DSA attention layers take no RoPE; its linear-attention and indexer widths are separate fields
    "glm5_next": dict(qk_rope_head_dim=0, mlp_layer_types=["sparse", "sparse"], linear_head_dim=8,
                      linear_num_heads=2, index_head_dim=8, index_n_heads=2, index_topk=8, index_kpool=4),
    "granitemoehybrid": dict(mamba_n_heads=4, mamba_d_state=8, mamba_chunk_size=8),  # 4 heads of 8 = 2 x hidden
    "lfm2_moe": dict(layer_types=["conv", "full_attention"]),  # no default: every layer indexes it
    # sliding-window layers hold twice the KV heads: 4 query heads over 1 (2 in those layers)
    "mimo_v2_flash": dict(num_attention_heads=4, num_key_value_heads=1, v_head_dim=8),
    "step3p7": dict(layer_types=["full_attention"] * 2, mlp_layer_types=["sparse"] * 2, share_expert_dim=32,
                    sliding_window=4),  # the sliding mask is built even with no sliding layer
    "zaya": dict(num_experts_per_tok=1),  # top-1 only
    "muse_spark": dict(moe_hidden_size=32),  # experts run wider than the router (4096 by default)
    # encoder-decoder with its own field names; every layer sparse; capacity 4 of the 12 tokens' 24 choices
    "nllb_moe": dict(vocab_size=64, d_model=16, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=32,
                     decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2, num_experts=4,
                     expert_capacity=4, encoder_sparse_step=1, decoder_sparse_step=1, max_position_embeddings=128,
                     dropout=0.0, attention_dropout=0.0, encoder_layerdrop=0.0, decoder_layerdrop=0.0,
                     moe_token_dropout=0.0),
}


def _field(config, name: str):
    """The config's value for ``name``, or None when it has no such global field (per-layer fields raise)."""
    try:
        return getattr(config, name)
    except Exception:  # noqa: BLE001  (AmbiguousGlobalPerLayerAttributeError and the like)
        return None


def _fits(defaults, name: str, value) -> bool:
    """The config has the field ``name`` and ``value`` is of its kind (a list-valued field keeps its default)."""
    default = _field(defaults, name)
    if default is None:  # unset by default (token ids, head_dim, moe_intermediate_size): ours is the value
        return name in _declared_fields(defaults)
    return isinstance(value, type(default)) or (isinstance(default, float) and isinstance(value, int))


def _declared_fields(config) -> set[str]:
    """The fields a config class declares (dataclass fields, or attributes its instance set)."""
    fields = set(getattr(type(config), "__dataclass_fields__", {}))
    return fields | set(vars(config))


def _config_class(family: str):
    """The config class of the family's text model: ``<family>_text`` when registered, else the family's, or its
    ``text_config`` sub-config when the family's config is a composite without a registered text config."""
    from transformers import CONFIG_MAPPING

    family = _CONFIG_KEYS.get(family, family)
    if f"{family}_text" in CONFIG_MAPPING:
        return CONFIG_MAPPING[f"{family}_text"]
    cls = CONFIG_MAPPING[family]
    return (getattr(cls, "sub_configs", None) or {}).get("text_config") or cls


def _model_class(config):
    """(model class for ``config``, has a causal-LM head): the Auto causal-LM or base model class for it, else the
    class of the family's modeling module built from that config class (a multimodal family's text model that no
    Auto class lists), a causal-LM head first."""
    import importlib
    import inspect

    from transformers import PreTrainedModel
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING

    cls = type(config)
    if cls in MODEL_FOR_CAUSAL_LM_MAPPING:
        return MODEL_FOR_CAUSAL_LM_MAPPING[cls], True
    if cls in MODEL_MAPPING:
        return MODEL_MAPPING[cls], False
    module = importlib.import_module(cls.__module__.replace(".configuration_", ".modeling_"))
    models = [c for name, c in vars(module).items() if inspect.isclass(c) and issubclass(c, PreTrainedModel)
              and c.__module__ == module.__name__ and getattr(c, "config_class", None) is cls
              and "PreTrained" not in name]
    for suffix, causal in (("ForCausalLM", True), ("Model", False)):
        found = [c for c in models if c.__name__.endswith(suffix)]
        if found:
            return found[0], causal
    raise ValueError(f"no model class in {module.__name__} is built from {cls.__name__}")


def tiny_config(family: str):
    """The family's config at tiny size: the shared fields it has set small, the family's own overrides
    (``_FAMILY_FIELDS``: fields its validators tie together, sub-configs), the rest its defaults."""
    cls = _config_class(family)
    defaults = cls()
    fields = {k: v for k, v in _TINY_FIELDS.items() if _fits(defaults, k, v)}
    if fields.get("qk_rope_head_dim") is not None and "head_dim" in fields:  # MLA: head_dim is the rope part
        fields["head_dim"] = fields["qk_rope_head_dim"]
    config = cls(**{**fields, **_FAMILY_FIELDS.get(family, {})})
    config._attn_implementation = "eager"
    return config


class Hidden(torch.nn.Module):
    """A base model without an LM head: its last hidden state as the output."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens):
        return self.model(tokens, use_cache=False).last_hidden_state


def build_any(family: str, impl: str = "grouped_mm", seed: int = 0):
    """(module from token ids to a tensor, a batch of token ids) for any family of ``ALL_FAMILIES``."""
    if family in FAMILIES or family == "switch_transformers":  # the families built by hand above
        name = "switch" if family == "switch_transformers" else family
        return build(name, impl if impl in IMPLS[name] else "eager", seed=seed)
    config = tiny_config(family)
    cls, causal = _model_class(config)
    config._experts_implementation = impl
    torch.manual_seed(seed)
    try:
        model = cls._from_config(config)
    except ValueError as exc:  # a family with its own experts code takes no implementation
        if "does not support setting experts implementation" not in str(exc):
            raise
        config = tiny_config(family)
        model = cls._from_config(config)
    if config.is_encoder_decoder:
        model = Seq2SeqLogits(model, "logits" if causal else "last_hidden_state")
    else:
        model = Logits(model) if causal else Hidden(model)
    model.train(False)
    gen = torch.Generator().manual_seed(seed + 1)
    return model, lambda: torch.randint(1, 64, (2, 6), generator=gen)


def survey(family: str, impl: str = "grouped_mm") -> list[tuple[str, str]]:
    """``moecc.explain`` of the family's tiny model: (block path, outcome) per row; one row with the error when the
    model does not build or run."""
    import moecc

    try:
        model, make_input = build_any(family, impl)
    except Exception as exc:  # noqa: BLE001  (a config moecc's generic builder cannot fill)
        return [("", f"not built: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")]
    try:
        found = moecc.explain(model, make_input(), quiet=True)
    except Exception as exc:  # noqa: BLE001
        return [("", f"not traced: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")]
    rows = [(b.spec.path, f"{b.outcome} [{b.spec.form}; {b.spec.summary()}]") for b in found.blocks]
    return rows or [("", f"no row ({found.graphs} graphs, breaks: {'; '.join(found.graph_breaks)[:200]})")]


def survey_status(rows: list[tuple[str, str]]) -> tuple[str, str]:
    """(status, what the report says) of one :func:`survey`, as docs/hf.md's table shows them."""
    first = rows[0][1]
    for prefix, status in (("not built: ", "not built here"), ("not traced: ", "not traced here"),
                           ("no row", "no row (a bug)")):
        if first.startswith(prefix):
            return status, first.removeprefix(prefix)
    parsed = [outcome.rpartition(" [") if outcome.endswith("]") else (outcome, "", "") for _, outcome in rows]
    done = [(o, tail[:-1]) for o, _, tail in parsed if o.startswith("rewritten")]
    if len(done) == len(rows):
        form, _, summary = done[0][1].partition("; ")
        return "rewritten", f"{len(rows)} blocks, {form}: {summary}"
    reasons = list(dict.fromkeys(o for o, _, _ in parsed if not o.startswith("rewritten")))
    if done:
        status = f"{len(done)}/{len(rows)} rewritten"
    else:
        status = "fallback" if all(r.startswith("fallback") for r in reasons) else "not rewritten"
    why = "; ".join(r.split(": ", 1)[-1] for r in reasons[:2])
    return status, f"{len(done)}/{len(rows)} rewritten; {why[:400]}"


def _survey_in_child(family: str, impl: str, timeout: float = 900.0) -> list[tuple[str, str]]:
    """:func:`survey` in a fresh process (one family's model, Dynamo state and checks freed with it)."""
    import json
    import subprocess
    import sys

    cmd = [sys.executable, __file__, "--one", family, impl]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [("", f"not traced: timed out after {timeout:.0f} s")]
    lines = [line for line in done.stdout.splitlines() if line.startswith("[")]
    if done.returncode or not lines:
        return [("", f"not traced: the survey process ended with status {done.returncode}"
                     f" ({(done.stderr.strip().splitlines() or [''])[-1][:160]})")]
    return [tuple(row) for row in json.loads(lines[-1])]


def table_row(family: str) -> str:
    """docs/hf.md's row for ``family``: its survey under grouped_mm and under "eager", each in its own process."""
    (g, g_what), (e, e_what) = (survey_status(_survey_in_child(family, impl)) for impl in ("grouped_mm", "eager"))
    what = g_what if e == g else f"{g_what}. Eager: {e_what}"
    return f"| {family} | {g} | {e} | {what.replace('|', '/')} |"


if __name__ == "__main__":
    # python tests/hf_zoo.py [FAMILY ...]: docs/hf.md's survey rows (all families without arguments), one process
    # per survey; python tests/hf_zoo.py --one FAMILY IMPL: one survey's rows as JSON (what each child runs).
    import json
    import sys

    if sys.argv[1:2] == ["--one"]:
        print(json.dumps(survey(sys.argv[2], sys.argv[3])), flush=True)
    else:
        for name in sys.argv[1:] or ALL_FAMILIES:
            print(table_row(name), flush=True)
