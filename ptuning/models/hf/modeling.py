"""transformers' own causal LMs (GLM, GLM-4, Llama, Qwen2, Qwen3, ...) with a P-Tuning v2 prefix.

How the prefix gets in: :func:`attach_prefix` takes a loaded transformers model and

1. sets its attention implementation to :data:`~ptuning.models.hf.attention.ATTENTION_NAME`, transformers'
   documented ``AttentionInterface`` hook: every attention layer then calls
   :func:`~ptuning.models.hf.attention.prefix_attention`, which puts the layer's prefix keys/values in front
   of the token keys/values (positions unshifted, never in the ``Cache``);
2. re-classes the instance to a thin subclass of its own class (``LlamaForCausalLM`` ->
   ``LlamaForCausalLMWithPrefix``, made once per class by :func:`prefix_class`) whose only code is
   :class:`PrefixCausalLM`: a ``forward`` that computes the prefix from ``prefix_encoder`` and hands it to
   the backbone as the keyword argument ``prefix`` (transformers forwards unknown keyword arguments of a
   model's ``forward`` through every decoder layer to the attention function), plus the loss contract of
   :mod:`ptuning.models.base` and the generation / checkpointing details below. The backbone's modules,
   parameters, state-dict keys and code are untouched;
3. adds ``prefix_encoder`` (a float32 :class:`~ptuning.prefix.PrefixEncoder`) and ``prefix_dropout``.

Gradient checkpointing (``activation_checkpointing_enable`` / ``gradient_checkpointing_enable``) is
non-reentrant only: a checkpointed decoder layer receives the prefix as a keyword argument, and reentrant
``torch.utils.checkpoint`` drops the gradients of tensors that do not come in as positional arguments.

Shapes: B batch, S tokens, P prefix length, V vocabulary, H hidden size.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.utils.deprecation import deprecate_kwarg

from ...jsonfile import read_json_object
from ...prefix import PrefixEncoder, PrefixKV, PrefixShape, prefix_key_values, reset_prefix
from ...weights import CheckpointError, is_gguf_file
from ..loss import project_and_loss
from ..packed import PackedLayout, check_sequence_ids, packed_position_ids
from .attention import register
from .gguf import gguf_model_config, load_gguf_causal_lm, reason


class PrefixCausalLM:
    """The code a transformers causal LM gains with :func:`attach_prefix` (a mixin in front of its class).

    Attributes:
        prefix_encoder: :class:`~ptuning.prefix.PrefixEncoder` (float32) or None.
        prefix_dropout: ``nn.Dropout`` applied to the prefix per batch row in training, or None.
    """

    prefix_encoder: PrefixEncoder | None
    prefix_dropout: nn.Dropout | None

    def prefix_key_values(self, batch_size: int, dtype: torch.dtype) -> PrefixKV | None:
        """The model's own prefix for a batch (per layer ``[B, G, P, D]`` in ``dtype``), or None."""
        if self.prefix_encoder is None:
            return None
        return prefix_key_values(self.prefix_encoder, batch_size, dtype, self.prefix_dropout)

    def cache_shape(self) -> tuple[int, int, int]:
        """``(G, D, L)`` of the attention, from the config (:func:`prefix_shape`)."""
        shape = prefix_shape(self.config, 0)
        return shape.num_key_value_heads, shape.head_dim, shape.num_layers

    def store_lm_head_column_major(self) -> None:
        """Nothing to prepare: transformers' ``lm_head`` stays as it is loaded (a tied head is the embedding)."""

    def _compute_dtype(self) -> torch.dtype:
        weight = self.get_input_embeddings().weight
        return weight.dtype if weight.is_floating_point() else torch.float32

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        loss_reduction: str = "mean",
        return_logits: bool = True,
        prefix: PrefixKV | None = None,
        slot_cache=None,
        sequence_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """The backbone's forward with the prefix in every attention layer.

        Args:
            input_ids: ``[B, S]``.
            attention_mask: ``[B, cached + S]`` (1 = real token) or None; a prefix is always visible.
            labels: ``[B, S]`` (-100 = ignored): the loss is the next-token cross-entropy over every target of
                the batch, in float32 (their mean, or their sum with ``loss_reduction="sum"``).
            logits_to_keep: as transformers: logits of the last ``logits_to_keep`` positions only (0 = all).
            return_logits: False with labels: no logits; the output projection runs only at the positions
                that predict a target.
            prefix: replaces the model's own prefix for this call (e.g. one prefix per row when serving; P = 0:
                none).
            slot_cache: a decode loop's :class:`~ptuning.generation.SlotCache`: the model's own cache is disabled
                and the slots reach every attention layer (see :mod:`ptuning.models.hf.attention`); in a decode
                step the model builds no mask (the slots have their own) and ``position_ids`` are required.
            sequence_ids: ``[B, S]`` for packed rows (see :mod:`ptuning.data.packing`): the positions restart at
                every row (unless ``position_ids`` are given) and each row attends over the prefix and its own
                tokens alone (:class:`~ptuning.models.packed.PackedLayout`; sliding-window layers through
                transformers' own packed-sequence mask, block-diagonal causal); no ``attention_mask``, no cache.
            kwargs: passed to the backbone (and from there to every attention layer).

        Returns:
            ``CausalLMOutputWithPast`` with ``loss``, ``logits`` ``[B, S or logits_to_keep, V]`` (None with
            ``return_logits=False``), ``cache`` (the tokens only, never the prefix).
        """
        if prefix is None:
            batch = (input_ids if input_ids is not None else inputs_embeds).shape[0]
            prefix = self.prefix_key_values(batch, self._compute_dtype())
        if sequence_ids is not None:
            check_sequence_ids(sequence_ids, input_ids, attention_mask, cache if slot_cache is None else slot_cache)
            # transformers reads positions that restart as packed sequences (masking_utils.find_packed_sequence_indices)
            if position_ids is None:
                position_ids = packed_position_ids(sequence_ids)
            kwargs["packed_layout"] = PackedLayout(sequence_ids)  # each row's attention alone (models.hf.attention)
            use_cache = False
        if slot_cache is not None:
            kwargs["slot_cache"] = slot_cache
            use_cache, cache = False, None
            attention_mask = _slot_cache_mask(slot_cache, attention_mask, position_ids)
        outputs = self.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            prefix=prefix,
            **kwargs,
        )
        logits, loss = project_and_loss(self.lm_head, outputs.last_hidden_state, labels, loss_reduction,
                                        return_logits=return_logits, logits_to_keep=logits_to_keep)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def prompt_position_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Positions ``[B, S]`` of a left-padded prompt batch: each row counts from 0 at its first real token
        (pads 0), as ``generate()`` numbers them, so left pads never shift a row's rotary positions."""
        if attention_mask is None:
            return torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
        return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)

    @staticmethod
    def next_position_ids(last: torch.Tensor) -> torch.Tensor:
        """Positions ``[B, 1]`` of the token after one at ``last`` ``[B, 1]``."""
        return last + 1

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kwargs):
        """transformers' activation checkpointing, non-reentrant (the prefix is a keyword argument of every
        checkpointed layer, and reentrant checkpointing drops gradients of keyword-argument tensors).

        Raises:
            ValueError: ``use_reentrant=True`` was asked for.
        """
        options = dict(activation_checkpointing_kwargs or {})
        if options.get("use_reentrant"):
            raise ValueError(
                "use_reentrant=True: reentrant checkpointing drops the prefix gradients (the prefix reaches each "
                "layer as a keyword argument); use the default use_reentrant=False"
            )
        options["use_reentrant"] = False
        return super().activation_checkpointing_enable(activation_checkpointing_kwargs=options, **kwargs)

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        # beam search / num_return_sequences repeat every row; a per-call prefix must follow its rows
        prefix = model_kwargs.pop("prefix", None)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        if prefix is not None:
            model_kwargs["prefix"] = expand_prefix(prefix, expand_size)
        return input_ids, model_kwargs


def _slot_cache_mask(slot_cache, attention_mask, position_ids):
    """The attention mask the backbone gets with a decode loop's slot cache: in a decode step the slots' own (a 4D
    mask is taken as it is, so no mask is built for the step; the cache holds it on its device, so a step copies
    nothing from the host), in a prefill the one given.

    Raises:
        ValueError: a decode step without ``position_ids``.
    """
    if slot_cache.mode != "decode":
        return attention_mask
    if position_ids is None:
        raise ValueError("position_ids [B, 1] are required in a decode step of a slot cache")
    return slot_cache.all_visible


def expand_prefix(prefix: PrefixKV, times: int) -> PrefixKV:
    """Every row of a prefix repeated ``times`` times in place (``repeat_interleave`` on the batch)."""
    if times == 1:
        return prefix

    def rows(t: torch.Tensor) -> torch.Tensor:
        return t if t.shape[0] == 1 else t.repeat_interleave(times, dim=0)

    mask = None if prefix.mask is None else prefix.mask.repeat_interleave(times, dim=0)
    return PrefixKV([rows(k) for k in prefix.keys], [rows(v) for v in prefix.values], mask)


_PREFIX_CLASSES: dict[type, type] = {}


def prefix_class(cls: type) -> type:
    """The subclass of a transformers causal LM class with :class:`PrefixCausalLM` in front (made once)."""
    if issubclass(cls, PrefixCausalLM):
        return cls
    if cls not in _PREFIX_CLASSES:
        name = f"{cls.__name__}WithPrefix"
        made = type(name, (PrefixCausalLM, cls),
                    {"__module__": __name__, "__doc__": f"{cls.__name__} with a P-Tuning v2 prefix (see {__name__})."})
        _PREFIX_CLASSES[cls] = made
        globals().setdefault(name, made)  # found by name, so a model pickles (torch.save, process spawns)
    return _PREFIX_CLASSES[cls]


def prefix_shape(config, pre_seq_len: int, prefix_projection: bool = False) -> PrefixShape:
    """The prefix that fits a transformers decoder config.

    G is ``num_key_value_heads`` (the attention heads when the config has none), D is ``head_dim`` where the
    config gives it (Qwen3, GLM-4-0414: not hidden / heads), else ``hidden_size // num_attention_heads``; L is
    ``num_hidden_layers``. With ``prefix_projection`` the MLP is H wide and its embedding H wide, as the
    original P-Tuning v2.
    """
    heads = config.num_attention_heads
    return PrefixShape(
        num_layers=config.num_hidden_layers,
        num_key_value_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        pre_seq_len=pre_seq_len,
        prefix_projection=prefix_projection,
        hidden_size=config.hidden_size,
    )


def _layer_key_shape(model: PreTrainedModel) -> tuple[int, int, int]:
    """(layers, key/value heads, head size) of the model's attention layers, read off their key projection."""
    attentions = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "k_proj")]
    if not attentions:
        cfg = model.config
        return cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    first = attentions[0]
    head_dim = first.head_dim
    return len(attentions), first.k_proj.out_features // head_dim, head_dim


def attach_prefix(model: PreTrainedModel, shape: PrefixShape | None, dropout: float = 0.0) -> PreTrainedModel:
    """Gives a loaded transformers causal LM the prefix attention, the model contract of
    :mod:`ptuning.models.base` and (with ``shape.pre_seq_len`` > 0) a float32 prefix encoder at
    ``model.prefix_encoder``, initialised as the original (PyTorch defaults).

    Works on any transformers decoder whose attention layers call the ``AttentionInterface`` with their
    ``layer_idx`` (Llama, Qwen2/3, GLM, GLM-4, ... and ChatGLM2/3 weights mapped onto ``GlmForCausalLM``).
    The model is changed in place and returned; its config records ``pre_seq_len`` (None without a prefix) and
    ``prefix_projection``.

    Args:
        shape: the prefix (e.g. :func:`prefix_shape`), or None / ``pre_seq_len`` 0 for the contract alone
            (it then computes exactly what the plain model computes with SDPA attention).
        dropout: probability of the prefix dropout in training.

    Raises:
        ValueError: ``shape`` does not fit the model's layers, key/value heads or head size.
    """
    if not isinstance(model, PreTrainedModel):
        raise ValueError(f"attach_prefix needs a transformers PreTrainedModel, got {type(model).__name__}")
    model.set_attn_implementation(register())
    model.__class__ = prefix_class(type(model))
    model.prefix_encoder = None
    model.prefix_dropout = None
    if shape is not None and shape.pre_seq_len:
        layers, groups, head_dim = _layer_key_shape(model)
        want = (shape.num_layers, shape.num_key_value_heads, shape.head_dim)
        if want != (layers, groups, head_dim):
            raise ValueError(
                f"prefix of (num_layers, num_key_value_heads, head_dim) = {want}, but the model's attention has "
                f"{(layers, groups, head_dim)}"
            )
        device = model.get_input_embeddings().weight.device
        encoder = PrefixEncoder(shape).to(device=device, dtype=torch.float32)
        reset_prefix(encoder, "random")
        model.prefix_encoder = encoder.train(model.training)
        model.prefix_dropout = nn.Dropout(dropout).train(model.training)
    # the prefix's settings ride along on the config, as ChatGLM-6B's config holds them (the memory estimate and
    # ChatGLM2/3's original config.json read them there)
    model.config.pre_seq_len = shape.pre_seq_len if model.prefix_encoder is not None else None
    model.config.prefix_projection = model.prefix_encoder is not None and shape.prefix_projection
    return model


def load_causal_lm_config(folder: str | Path):
    """The transformers config of a local model folder (``AutoConfig``) or of a ``.gguf`` file (the config stored
    in it, :mod:`.gguf`); remote code is never run.

    Raises:
        CheckpointError: no or unreadable ``config.json``, or a ``model_type`` only remote code defines; a file
            that is no GGUF model.
    """
    if is_gguf_file(folder):
        return gguf_model_config(folder)
    config_file = Path(folder) / "config.json"
    raw = read_json_object(config_file, CheckpointError, "model config")
    model_type = raw.get("model_type")
    if model_type not in CONFIG_MAPPING:
        remote = " (only remote code, auto_map, defines it; that is never run)" if raw.get("auto_map") else ""
        raise CheckpointError(
            f"{config_file}: model_type {model_type!r} is not a transformers model{remote}; expected a "
            "transformers-native checkpoint (e.g. the model's *-hf release)"
        )
    try:
        return AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{folder}: {reason(err)}") from None


def load_causal_lm(folder: str | Path, *, dtype: torch.dtype = torch.float32, device=None) -> PreTrainedModel:
    """A transformers-native causal LM from a local folder (``config.json`` + weights in the HF layout) or a
    ``.gguf`` file (de-quantized by transformers' GGUF loader, :mod:`.gguf`), in ``dtype``, without a prefix
    (see :func:`attach_prefix`). Remote code is never run: the config's ``model_type`` must be one transformers
    knows.

    Raises:
        CheckpointError: no config, a config only remote code defines (``auto_map``), or weights that do not
            fit (names the keys); a file that is no GGUF model.
    """
    folder = Path(folder)
    if is_gguf_file(folder):
        model = load_gguf_causal_lm(folder, dtype=dtype)
        return model.to(device) if device is not None else model
    config_file = folder / "config.json"
    config = load_causal_lm_config(folder)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(folder), config=config, dtype=dtype, trust_remote_code=False, output_loading_info=True,
            attn_implementation="sdpa",
        )
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{folder}: {reason(err)}") from None
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = [k if isinstance(k, str) else k[0] for k in info.get(kind, [])]
        if keys:
            more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
            problems.append(f"{kind.replace('_', ' ')}: {', '.join(sorted(keys)[:5])}{more}")
    if problems:
        raise CheckpointError(f"{folder}: the weights do not fit {config_file.name} ({'; '.join(problems)})")
    if device is not None:
        model.to(device)
    return model.eval()


def load_prefix_model(
    folder: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    pre_seq_len: int | None,
    prefix_projection: bool = False,
    prefix_dropout: float = 0.0,
    device=None,
) -> PreTrainedModel:
    """:func:`load_causal_lm` then :func:`attach_prefix` with the prefix that fits the config
    (``pre_seq_len`` None or 0: no prefix)."""
    model = load_causal_lm(folder, dtype=dtype, device=device)
    shape = prefix_shape(model.config, pre_seq_len, prefix_projection) if pre_seq_len else None
    return attach_prefix(model, shape, prefix_dropout)
