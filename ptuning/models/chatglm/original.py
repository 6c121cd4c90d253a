"""Full-model export in the original ChatGLM-6B layout, so the original demos load what we save.

The original ``THUDM/chatglm-6b`` folder holds ``pytorch_model-0000N-of-0000M.bin`` shards (pickled state
dicts), ``pytorch_model.bin.index.json`` and a ``config.json`` with the original keys and an ``auto_map``
pointing at its ``configuration_chatglm.py`` / ``modeling_chatglm.py``. Its state dict also stores each
layer's rotary ``inv_freq`` buffer (float16-rounded inverse frequencies), which we recompute instead of
keeping; the export writes them back. A prefix, when the model has one, is saved under the original's
``transformer.prefix_encoder.*`` keys with ``pre_seq_len`` / ``prefix_projection`` in the config, which is
how the original code loads a P-Tuning v2 model in one piece.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ...prefix import is_prefix_param
from ...quantization import is_quantized
from ...weights import BIN_INDEX, CheckpointError, save_torch
from .layers import rotary_inv_freq

SHARD_NAME = "pytorch_model-{index:05d}-of-{total:05d}.bin"
DEFAULT_MAX_SHARD_BYTES = 2 * 10**9  # the original's shards are about 1.7 GB each
AUTO_MAP = {
    "AutoConfig": "configuration_chatglm.ChatGLMConfig",
    "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
}
# config.json keys of the original (configuration_chatglm.py), in its order
ORIGINAL_CONFIG_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_attention_heads",
    "layernorm_epsilon",
    "use_cache",
    "bos_token_id",
    "eos_token_id",
    "mask_token_id",
    "gmask_token_id",
    "pad_token_id",
    "max_sequence_length",
    "inner_hidden_size",
    "position_encoding_2d",
    "quantization_bit",
    "pre_seq_len",
    "prefix_projection",
)
# files of a model folder that the original demos need beside the weights (code, tokenizer)
COMPANION_SUFFIXES = (".py", ".model")
COMPANION_NAMES = (
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "LICENSE",
    "MODEL_LICENSE",
)


def original_config(config, dtype: torch.dtype) -> dict:
    """``config.json`` as the original writes it, for a :class:`ChatGLMConfig` and the saved dtype."""
    values = {
        "architectures": ["ChatGLMModel"],
        "auto_map": dict(AUTO_MAP),
        "model_type": "chatglm",
        **{key: getattr(config, key) for key in ORIGINAL_CONFIG_KEYS},
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    values["quantization_bit"] = 0  # the saved weights are full precision
    return values


def original_state_dict(model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's weights under the original keys, backbone in ``dtype`` (prefix float32, as the original
    P-Tuning v2 script saves it), with the per-layer ``rotary_emb.inv_freq`` buffers added."""
    if is_quantized(model):
        raise CheckpointError(
            "the model's backbone is quantized: export from the full-precision model (load it without quantization_bit)"
        )
    config = model.config
    inv_freq = rotary_inv_freq(config.head_dim).to(dtype)  # float16-rounded, as the original's buffer
    state: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        if key.startswith("transformer.layers.") and key.endswith(".input_layernorm.weight"):
            layer = key[: -len(".input_layernorm.weight")]
            state[f"{layer}.attention.rotary_emb.inv_freq"] = inv_freq.clone()
        target = torch.float32 if is_prefix_param(key) else dtype
        state[key] = tensor.detach().to(device="cpu", dtype=target).contiguous()
    return state


def _shards(state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards


def export_full(
    model,
    out_dir: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    companions_from: str | os.PathLike | None = None,
) -> list[Path]:
    """Writes ``model`` (backbone and prefix, if any) in the original layout.

    Args:
        model: a :class:`~ptuning.models.chatglm.ChatGLMForConditionalGeneration` (not quantized).
        out_dir: the folder to write (created).
        dtype: the backbone's saved dtype (default: its current one; the original checkpoint is float16).
        max_shard_bytes: the largest shard; the layout is always sharded with an index, as the original's.
        companions_from: a model folder whose code and tokenizer files (``*.py``, ``ice_text.model``,
            ``tokenizer_config.json``...) are copied beside the weights, so ``AutoModel.from_pretrained(out_dir,
            trust_remote_code=True)`` and the original demos find them.

    Returns:
        The shard paths.
    """
    dtype = dtype or next(p.dtype for n, p in model.named_parameters() if not is_prefix_param(n))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = original_state_dict(model, dtype)
    shards = _shards(state, max_shard_bytes)
    paths, weight_map = [], {}
    for i, part in enumerate(shards, start=1):
        name = SHARD_NAME.format(index=i, total=len(shards))
        save_torch(part, out_dir / name)
        paths.append(out_dir / name)
        weight_map.update({key: name for key in part})
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
        "weight_map": weight_map,
    }
    (out_dir / BIN_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (out_dir / "config.json").write_text(json.dumps(original_config(model.config, dtype), indent=2) + "\n")
    if companions_from is not None:
        source = Path(companions_from)
        for path in sorted(source.iterdir()):
            if path.is_file() and (path.suffix in COMPANION_SUFFIXES or path.name in COMPANION_NAMES):
                shutil.copy2(path, out_dir / path.name)
    return paths


__all__ = [
    "AUTO_MAP",
    "ORIGINAL_CONFIG_KEYS",
    "SHARD_NAME",
    "export_full",
    "original_config",
    "original_state_dict",
]
