"""ChatGLM2/3 weights: the original keys <-> transformers' ``GlmForCausalLM``, shard by shard.

N heads, G key/value groups, D head size, H hidden, F ffn_hidden_size, V padded vocabulary.

| original key (``transformer.`` + ...)                    | ``GlmForCausalLM`` key                          |
| --- | --- |
| ``embedding.word_embeddings.weight`` [V, H]              | ``model.embed_tokens.weight``                   |
| ``encoder.layers.i.input_layernorm.weight``              | ``model.layers.i.input_layernorm.weight``       |
| ``encoder.layers.i.self_attention.query_key_value`` w/b  | rows N·D / G·D / G·D -> ``self_attn.q_proj`` / ``k_proj`` / ``v_proj`` |
| ``encoder.layers.i.self_attention.dense.weight``         | ``model.layers.i.self_attn.o_proj.weight``      |
| ``encoder.layers.i.post_attention_layernorm.weight``     | ``model.layers.i.post_attention_layernorm.weight`` |
| ``encoder.layers.i.mlp.dense_h_to_4h.weight`` [2F, H]    | ``model.layers.i.mlp.gate_up_proj.weight``      |
| ``encoder.layers.i.mlp.dense_4h_to_h.weight`` [H, F]     | ``model.layers.i.mlp.down_proj.weight``         |
| ``encoder.final_layernorm.weight``                       | ``model.norm.weight``                           |
| ``output_layer.weight`` [V, H]                           | ``lm_head.weight``                              |
| ``rotary_pos_emb.inv_freq``                              | (recomputed; its values are never used)         |
| ``prefix_encoder.*``                                     | the model's prefix encoder                      |

The query/key/value rows are split, not interleaved per head (query head n is rows n·D .. n·D+D-1; the G key
groups follow, then the G value groups), and SwiGLU's first half is the gate in both.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from ...prefix import is_prefix_param
from ...quantization import is_quantized
from ...weights import CheckpointError, iter_shards, read_matching, save_weights
from .config import original_config_dict

ORIGINAL_PREFIX = "transformer.prefix_encoder."
INV_FREQ = "transformer.rotary_pos_emb.inv_freq"

_LAYER = re.compile(r"transformer\.encoder\.layers\.(\d+)\.(.+)")
_LAYER_NAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}


def is_original_prefix_key(key: str) -> bool:
    return key.startswith(ORIGINAL_PREFIX)


def glm_items(key: str, tensor: torch.Tensor, num_heads: int, num_groups: int, head_dim: int
              ) -> list[tuple[str, torch.Tensor]] | None:
    """The ``GlmForCausalLM`` entries of one original backbone entry (views, no copy), ``[]`` for a buffer
    that is recomputed, or None for a key that is not part of the backbone."""
    if key == INV_FREQ or key.endswith(".rotary_pos_emb.inv_freq"):
        return []
    if key in _TOP_NAMES:
        return [(_TOP_NAMES[key], tensor)]
    match = _LAYER.fullmatch(key)
    if match is None:
        return None
    layer, rest = match.groups()
    base = f"model.layers.{layer}."
    if rest in _LAYER_NAMES:
        return [(base + _LAYER_NAMES[rest], tensor)]
    if rest in ("self_attention.query_key_value.weight", "self_attention.query_key_value.bias"):
        kind = rest.rsplit(".", 1)[1]
        sizes = [num_heads * head_dim, num_groups * head_dim, num_groups * head_dim]
        if tensor.shape[0] != sum(sizes):
            return [(f"{base}self_attn.query_key_value.{kind}", tensor)]  # reported as a shape mismatch
        q, k, v = tensor.split(sizes, dim=0)
        return [(f"{base}self_attn.{name}_proj.{kind}", part) for name, part in zip("qkv", (q, k, v), strict=True)]
    return None


def original_items(state: dict[str, torch.Tensor], num_heads: int, num_groups: int, head_dim: int
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """The original keys of a ``GlmForCausalLM`` backbone state dict (query/key/value rows concatenated),
    in the original's order. Prefix keys are not included."""
    inverse_top = {v: k for k, v in _TOP_NAMES.items()}
    inverse_layer = {v: k for k, v in _LAYER_NAMES.items()}
    yield inverse_top["model.embed_tokens.weight"], state["model.embed_tokens.weight"]
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("model.layers.")})
    for i in layers:
        glm = f"model.layers.{i}."
        original = f"transformer.encoder.layers.{i}."
        yield original + "input_layernorm.weight", state[glm + "input_layernorm.weight"]
        for kind in ("weight", "bias"):
            parts = [state.get(f"{glm}self_attn.{n}_proj.{kind}") for n in "qkv"]
            if all(p is not None for p in parts):
                yield f"{original}self_attention.query_key_value.{kind}", torch.cat(parts, dim=0)
        for name in ("self_attn.o_proj.weight", "post_attention_layernorm.weight", "mlp.gate_up_proj.weight",
                     "mlp.down_proj.weight"):
            yield original + inverse_layer[name], state[glm + name]
    yield inverse_top["model.norm.weight"], state["model.norm.weight"]
    yield inverse_top["lm_head.weight"], state["lm_head.weight"]


def rotary_inv_freq(head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """The original's ``rotary_pos_emb.inv_freq`` buffer ``[D/4]`` (written back by exports; never read)."""
    dim = head_dim // 2
    return (1.0 / (10000 ** (torch.arange(0, dim, 2).to(dtype) / dim))).to(dtype)


def load_backbone(model, folder: Path, config, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Loads an original folder's backbone into ``model`` (a ``GlmForCausalLM`` built on the meta device),
    one shard at a time: each tensor is cast to ``dtype`` and assigned (no second copy of the model).

    Args:
        config: the model's ``GlmConfig`` (for the query/key/value split).

    Returns:
        The ``transformer.prefix_encoder.*`` tensors found in the folder (float32, original keys).

    Raises:
        CheckpointError: a key that is neither backbone nor prefix, a shape that does not fit the config, a
            missing backbone key, or an unreadable file (each names the file and key).
    """
    expected = model.state_dict()
    heads, groups, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    loaded: set[str] = set()
    prefix: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    config_file = folder / "config.json"
    for file, shard in iter_shards(folder):
        part = {}
        for key, tensor in shard.items():
            if is_original_prefix_key(key):
                prefix[key] = tensor.detach().to(torch.float32).clone()
                continue
            items = glm_items(key, tensor, heads, groups, head_dim)
            if items is None:
                unexpected.append(f"{key} ({file.name})")
                continue
            for name, value in items:
                if name not in expected or tuple(value.shape) != tuple(expected[name].shape):
                    want = list(expected[name].shape) if name in expected else "no such weight"
                    raise CheckpointError(
                        f"{file}: '{key}' has shape {list(tensor.shape)}, which does not fit the model built "
                        f"from {config_file} (expected {want} for {name})"
                    )
                part[name] = value.to(dtype)
        model.load_state_dict(part, strict=False, assign=True)
        loaded.update(part)
        del shard, part
    if unexpected:
        raise CheckpointError(f"{folder}: unexpected key(s) {', '.join(unexpected[:5])} (not a ChatGLM2/3 weight)")
    missing = [k for k in expected if k not in loaded]
    if missing:
        names = list(dict.fromkeys(original_name(k) for k in missing))
        raise CheckpointError(
            f"{folder}: missing weight(s) {', '.join(names[:5])}" + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        )
    return prefix


def original_name(glm_key: str) -> str:
    """The original key that holds a ``GlmForCausalLM`` weight (for messages)."""
    inverse_top = {v: k for k, v in _TOP_NAMES.items()}
    if glm_key in inverse_top:
        return inverse_top[glm_key]
    parts = glm_key.split(".", 3)  # model, layers, i, rest
    if len(parts) == 4 and parts[1] == "layers":
        rest = parts[3]
        inverse_layer = {v: k for k, v in _LAYER_NAMES.items()}
        if rest in inverse_layer:
            rest = inverse_layer[rest]
        elif rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
            rest = "self_attention.query_key_value." + rest.rsplit(".", 1)[1]
        return f"transformer.encoder.layers.{parts[2]}.{rest}"
    return glm_key


def original_state_dict(model, dtype: torch.dtype | None = None, *, with_prefix: bool = True
                        ) -> dict[str, torch.Tensor]:
    """A loaded ChatGLM2/3 model's weights under the original keys, in the original's order: backbone in
    ``dtype`` (default: its own), the ``rotary_pos_emb.inv_freq`` buffer written back, and with
    ``with_prefix`` the prefix encoder float32 as ``transformer.prefix_encoder.*``.

    Raises:
        CheckpointError: the backbone is quantized (export the full-precision model).
    """
    state = {k: v for k, v in model.state_dict().items() if not is_prefix_param(k)}
    if is_quantized(model):
        raise CheckpointError(
            "the model's backbone is quantized: export from the full-precision model (load it without quantization_bit)"
        )
    config = model.config
    dtype = dtype or state["model.embed_tokens.weight"].dtype
    out = {}
    for key, tensor in original_items(state, config.num_attention_heads, config.num_key_value_heads, config.head_dim):
        out[key] = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
        if key == "transformer.embedding.word_embeddings.weight":
            out[INV_FREQ] = rotary_inv_freq(config.head_dim, dtype)
    encoder = getattr(model, "prefix_encoder", None)
    if with_prefix and encoder is not None:
        for key, tensor in encoder.state_dict().items():
            out[ORIGINAL_PREFIX + key] = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()
    return out


def save_original(model, folder: str | Path, *, dtype: torch.dtype | None = None, safe: bool = False,
                  max_shard_bytes: int | None = 2 * 10**9, with_prefix: bool = True, tokenizer=None) -> list[Path]:
    """Writes a model as an original ChatGLM2/3 folder: ``config.json`` with the original keys (and
    ``chatglm_version``), the weights under the original keys (``pytorch_model-0000N-of-0000M.bin`` + index as
    the published folders, or safetensors with ``safe``), and the tokenizer when given. With ``with_prefix``
    and a prefix, ``pre_seq_len`` / ``prefix_projection`` and ``transformer.prefix_encoder.*`` are included:
    the whole-model P-Tuning layout the original code loads in one piece.

    Returns:
        The weight files written.
    """
    folder = Path(folder)
    state = original_state_dict(model, dtype, with_prefix=with_prefix)
    saved = state["transformer.embedding.word_embeddings.weight"].dtype
    has_prefix = with_prefix and getattr(model, "prefix_encoder", None) is not None
    config = original_config_dict(model.config, dtype=str(saved).removeprefix("torch."), with_prefix=has_prefix)
    paths = save_weights(state, folder, safe=safe, max_shard_bytes=max_shard_bytes)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return paths


def read_original_prefix(folder: str | Path) -> dict[str, torch.Tensor]:
    """Only the ``transformer.prefix_encoder.*`` tensors of a folder (float32, original keys), reading no
    other tensor (:func:`ptuning.weights.read_matching`): a ChatGLM3 ``finetune_demo`` checkpoint (a whole
    12 GB model with the prefix inside) gives up its prefix this way.

    Raises:
        CheckpointError: unreadable files, or no prefix key at all.
    """
    prefix = read_matching(folder, is_original_prefix_key)
    if not prefix:
        raise CheckpointError(f"{folder}: no {ORIGINAL_PREFIX}* weights (not a P-Tuning v2 model or checkpoint)")
    return {k: v.to(torch.float32) for k, v in prefix.items()}


__all__ = [
    "INV_FREQ",
    "ORIGINAL_PREFIX",
    "glm_items",
    "is_original_prefix_key",
    "load_backbone",
    "original_items",
    "original_state_dict",
    "read_original_prefix",
    "rotary_inv_freq",
    "save_original",
]
