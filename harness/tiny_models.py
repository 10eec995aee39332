"""Tiny random-initialised models of transformers' causal-LM architectures, built from the
config classes alone (no hub).

A default config describes a full-size model (often billions of parameters). ``tiny_config``
shrinks it by overriding the attribute names configs commonly use for widths, depths, heads,
experts and vocabulary, in the config and in every nested config (``text_config``,
``vision_config`` ...), and truncates per-layer lists and patterns to the new depth. The
overrides go through the config's constructor, so derived fields are recomputed.
Architectures whose configs need more than that get an entry in ``SPECIAL``.
"""

from __future__ import annotations

import torch
from torch import nn

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 32, 2, 4, 2, 8, 128
# The largest tiny model accepted; more means the shrinking missed a size attribute.
MAX_PARAMETERS = 20_000_000

SIZES: dict[str, int] = {
    **dict.fromkeys(
        ("hidden_size", "n_embd", "d_model", "embed_dim", "embedding_dim", "emb_dim", "dim", "word_embed_proj_dim",
         "projection_dim",
         "out_hidden_size", "projector_hidden_size", "text_hidden_size", "hidden_size_global",
         "encoder_hidden_size", "embedding_size", "attention_hidden_size"),
        HIDDEN,
    ),
    **dict.fromkeys(
        ("intermediate_size", "ffn_dim", "n_inner", "d_ff", "encoder_ffn_dim", "decoder_ffn_dim", "ffn_hidden_size",
         "mlp_dim", "intermediate_size_mlp", "dense_intermediate_size", "dim_ff", "dff"),
        2 * HIDDEN,
    ),
    **dict.fromkeys(
        ("moe_intermediate_size", "shared_expert_intermediate_size", "shared_intermediate_size",
         "expert_ffn_hidden_size",
         "shared_experts_intermediate_size", "moe_shared_expert_intermediate_size"),
        HIDDEN,
    ),
    **dict.fromkeys(
        ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "encoder_layers", "depth",
         "num_decoder_layers", "num_blocks"),
        LAYERS,
    ),
    **dict.fromkeys(
        ("num_attention_heads", "n_head", "num_heads", "n_heads", "encoder_attention_heads",
         "decoder_attention_heads", "attention_heads"),
        HEADS,
    ),
    **dict.fromkeys(("num_key_value_heads",), KV_HEADS),
    **dict.fromkeys(("head_dim", "kv_channels", "attention_head_dim", "dim_head", "v_head_dim"), HEAD_DIM),
    # Multi-head latent attention: the rope part of a head is its head_dim.
    **{"kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": HEAD_DIM, "qk_nope_head_dim": HEAD_DIM},
    "rotary_dim": HEAD_DIM // 2,
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "moe_top_k"), 2),
    **dict.fromkeys(("n_shared_experts", "num_shared_experts", "moe_num_shared_experts"), 1),
    **dict.fromkeys(("n_group", "topk_group", "num_expert_group", "n_groups"), 1),
    **{"index_head_dim": HEAD_DIM, "index_n_heads": HEADS},
    # state-space layers
    **{"mamba_n_heads": 4, "mamba_d_head": 16, "mamba_headdim": 16, "mamba_d_ssm": 64, "mamba_d_state": 16,
       "mamba_dt_rank": 8, "time_step_rank": 8, "state_size": 16, "ssm_state_size": 16, "mamba_chunk_size": 16,
       "n_mamba_heads": 4, "mamba_num_heads": 4, "mamba_head_dim": 16},
    # linear-attention layers
    **dict.fromkeys(("linear_head_dim", "linear_key_head_dim", "linear_value_head_dim"), HEAD_DIM),
    **dict.fromkeys(("linear_num_heads", "linear_num_key_heads", "linear_num_value_heads"), HEADS),
    **{"vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 8, "num_kv_shared_layers": 0},
    "first_k_dense_replace": 1,
    "vocab_size": VOCAB,
}
# Logit transforms set to values that matter even for the small logits of a random model.
TRANSFORMS = {"final_logit_softcapping": 3.0, "logits_scaling": 4.0, "unpadded_vocab_size": VOCAB - 8}
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "depth")


def _layer_count(values: dict) -> int | None:
    return next((values[k] for k in LAYER_COUNT_KEYS if isinstance(values.get(k), int)), None)


def _heads(values: dict) -> int | None:
    names = ("num_attention_heads", "n_head", "num_heads")
    return next((values[k] for k in names if isinstance(values.get(k), int)), None)


def _kept_layers(values: dict, layers: int) -> list[int]:
    """Which of ``layers`` layers to keep, ``LAYERS`` of them: greedily those that show kinds
    (entries of the per-layer lists and patterns) not shown yet, so a hybrid keeps an
    attention layer and an MoE a sparse one; ties go to the earlier layer."""
    per_layer = [
        list(map(str, v))
        for k, v in values.items()
        if (isinstance(v, list) or isinstance(v, str) and "pattern" in k) and len(v) == layers
    ]
    keep: list[int] = []
    seen: set[tuple[int, str]] = set()
    while len(keep) < min(LAYERS, layers):
        def new_kinds(i: int) -> int:
            return len({(n, kinds[i]) for n, kinds in enumerate(per_layer)} - seen)
        best = max((i for i in range(layers) if i not in keep), key=lambda i: (new_kinds(i), -i))
        keep.append(best)
        seen |= {(n, kinds[best]) for n, kinds in enumerate(per_layer)}
    return sorted(keep)


def _shrunk(values: dict) -> dict:
    """The overrides that shrink one config's ``to_dict()``, nested configs and dicts
    recursively (passed whole: a nested config's class defaults can differ from the
    composite's, which the full-size ``to_dict()`` records)."""
    overrides = {}
    layers = _layer_count(values)
    keep = _kept_layers(values, layers) if layers and layers > LAYERS else None
    for key, value in values.items():
        if key == "per_layer_config" and value:
            overrides[key] = {}  # keyed by full-size layer indices
        elif isinstance(value, dict):
            nested = _shrunk(value)
            if "model_type" in value or nested:
                overrides[key] = {**value, **nested}
        elif key == "num_key_value_heads" and value is not None and value == _heads(values):
            overrides[key] = HEADS  # multi-head (or latent) attention stays so
        elif key in ("head_dim", "num_key_value_heads", "num_experts_per_tok") and value is None:
            overrides[key] = SIZES[key]  # None defaults some modeling code cannot take
        elif key in SIZES and isinstance(value, int) and not isinstance(value, bool) and value > SIZES[key]:
            overrides[key] = SIZES[key]
        elif keep and (isinstance(value, list) or isinstance(value, str) and "pattern" in key) and len(value) == layers:
            kept = [value[i] for i in keep]
            overrides[key] = "".join(kept) if isinstance(value, str) else kept
        elif key == "mrope_section" and isinstance(value, list) and len(value) > 1:
            half = HEAD_DIM // 2
            overrides[key] = [half // len(value)] * (len(value) - 1) + [half - half // len(value) * (len(value) - 1)]
        elif key in TRANSFORMS:
            overrides[key] = TRANSFORMS[key]
        elif isinstance(key, str) and ("drop" in key.lower() or "jitter" in key):
            if isinstance(value, float) and value > 0:
                overrides[key] = 0.0
    return overrides


def _is_id_key(key) -> bool:
    return isinstance(key, str) and key.endswith(("_token_id", "_token_index", "_token_ids", "_id"))


def _special_ids(values: dict, found: set[int]) -> set[int]:
    for key, value in values.items():
        if isinstance(value, dict):
            _special_ids(value, found)
        elif _is_id_key(key):
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, int) and not isinstance(item, bool) and item >= VOCAB:
                    found.add(item)
    return found


def _remapped_ids(values: dict, mapping: dict[int, int]) -> dict:
    """Overrides moving token ids beyond the tiny vocabulary to its top, distinct ids
    staying distinct (an embedding's padding_idx must lie inside it)."""
    overrides = {}
    for key, value in values.items():
        if isinstance(value, dict) and "model_type" in value:
            nested = _remapped_ids(value, mapping)
            if nested:
                overrides[key] = nested
        elif _is_id_key(key) and isinstance(value, list):
            if any(item in mapping for item in value if isinstance(item, int)):
                overrides[key] = [mapping.get(item, item) if isinstance(item, int) else item for item in value]
        elif _is_id_key(key) and isinstance(value, int) and value in mapping:
            overrides[key] = mapping[value]
    return overrides


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        both_dicts = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both_dicts else value
    return merged


def tiny_config(model_type: str):
    """A small config of ``model_type``: see the module docstring."""
    from transformers import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    defaults = config_class().to_dict()
    mapping = {old: VOCAB - 1 - i for i, old in enumerate(sorted(_special_ids(defaults, set())))}
    overrides = _merge(_merge(_shrunk(defaults), _remapped_ids(defaults, mapping)), SPECIAL.get(model_type, {}))
    return config_class(**overrides)


def build_tiny_model(model_type: str, class_name: str, seed: int = 0) -> nn.Module:
    """``class_name`` of ``transformers`` built from ``tiny_config(model_type)`` in float32 with
    eager attention, seeded; raises ``ValueError`` when it is still too large."""
    import transformers

    config = tiny_config(model_type)
    model_class = getattr(transformers, class_name)
    # As the auto classes do: a class of one part of a composite config gets that part.
    for name, sub_config_class in getattr(config, "sub_configs", {}).items():
        if getattr(model_class, "config_class", None) == sub_config_class and type(config) is not sub_config_class:
            config = getattr(config, name)
            break
    with torch.device("meta"):
        size = sum(p.numel() for p in model_class._from_config(config, attn_implementation="eager").parameters())
    if size > MAX_PARAMETERS:
        raise ValueError(f"still {size / 1e6:.0f}M parameters after shrinking")
    torch.manual_seed(seed)
    model = model_class._from_config(config, attn_implementation="eager").float()
    if model_type in AFTER_BUILD:
        AFTER_BUILD[model_type](model)
    return model


_DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 10000.0}
_QSA_INDEXER = {
    "indexer_budget": 8, "indexer_compress_ratio": 2, "indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 8
}


def _mrope(sections: tuple[int, ...] = (1, 1, 2), config_key: str = "text_config") -> dict:
    """Multimodal rotary sections summing to the rotary half of a ``HEAD_DIM`` head (the
    modeling default is sized for the full model)."""
    return {config_key: {"rope_parameters": {**_DEFAULT_ROPE, "mrope_section": list(sections)}}}


# Per-architecture config overrides beyond the generic shrinking.
SPECIAL: dict[str, dict] = {
    **{m: _mrope() for m in ("qwen2_vl", "qwen2_5_vl", "paddleocr_vl", "glm4v", "glm46v", "glm_ocr", "glmga")},
    "glm4v_moe": _mrope((1, 1, 0)),  # partial rotary: half of the head rotates
    "qwen2_5_omni_thinker": {"text_config": _mrope()["text_config"]},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
    # Zamba's attention sees [hidden, embeddings]: twice the width; its shared block needs two uses.
    "zamba": {"num_hidden_layers": 4, "layers_block_type": ["linear_attention", "hybrid"] * 2,
              "attention_hidden_size": 2 * HIDDEN, "attention_head_dim": 2 * HIDDEN // HEADS},
    "zamba2": {"hybrid_layer_ids": [1], "attention_hidden_size": 2 * HIDDEN, "attention_head_dim": 2 * HIDDEN // HEADS,
               "kv_channels": 2 * HIDDEN // HEADS},
    "bamba": {"attn_layer_indices": [1]},
    "granitemoehybrid": {"layer_types": ["mamba", "attention"]},
    "recurrent_gemma": {"block_types": ["recurrent", "attention"]},
    "mamba2": {"num_heads": 8, "head_dim": 8, "n_groups": 1},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "dots1": {"n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2},
    # Default configs that do not build as they are in this transformers version:
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}},
    "cohere_compass_text": {"rope_parameters": dict.fromkeys(("full_attention", "sliding_attention"), _DEFAULT_ROPE)},
    "qwen4_exp_text": _QSA_INDEXER,
    "qwen4_exp": {"text_config": _QSA_INDEXER},
    # Its sliding-window heads are latent-attention heads: head_dim = nope + rope.
    "dots3_note_text": {"head_dim": 2 * HEAD_DIM},
    # Training needs the sequence length (harness: 12) to be the product of the axial shape.
    "reformer": {"is_decoder": True, "axial_pos_embds_dim": [HIDDEN // 2, HIDDEN // 2], "axial_pos_shape": [4, 3]},
}


# Per-architecture set-up a model needs after construction.
AFTER_BUILD = {
    "xmod": lambda model: model.set_default_language("en_XX"),
}
