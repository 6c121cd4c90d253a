"""ChatGLM-6B (v1) with a P-Tuning v2 prefix, on transformers 5.

Parameter names equal the original checkpoint keys, so real ``chatglm-6b`` weights and P-Tuning v2
prefixes load without a mapping. Shapes: B batch, S new tokens, T = cached + new tokens, P prefix
length, L layers, N heads, D head size, H hidden size, V vocabulary.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg

from ...prefix import (
    PrefixEncoder,
    PrefixKV,
    PrefixShape,
    cast_backbone,
    is_prefix_param,
    prefix_key_values,
    reset_prefix,
)
from ...weights import IGNORED_KEYS, CheckpointError, converted, iter_shards, save_weights
from ..loss import project_and_loss
from ..packed import PackedLayout, check_sequence_ids
from .cache import ChatGLMCache
from .config import ChatGLMConfig
from .layers import GLMBlock, rotary_inv_freq, rotary_tables
from .masks import build_masks, build_packed_masks, extend_step_masks, mask_token_ids


class ChatGLMPreTrainedModel(PreTrainedModel):
    """What ChatGLM-6B's model classes share with transformers' ``PreTrainedModel``: the config class, the
    checkpoint key prefix ``transformer.``, the prefix encoder kept in float32 whatever the load dtype, and the
    weight init of a new model (normal, std 0.02, as the original; the prefix embedding N(0, 1), as the
    original leaves it). The published checkpoints' ``rotary_emb.inv_freq`` buffers are ignored when loading
    (recomputed)."""

    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock"]
    _keep_in_fp32_modules = ["prefix_encoder"]
    _supports_sdpa = True
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, PrefixEncoder):
            reset_prefix(module)  # the original leaves the prefix at PyTorch's defaults (embedding N(0, 1))
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class ChatGLMModel(ChatGLMPreTrainedModel):
    """The transformer (checkpoint prefix ``transformer.``): embeddings, blocks, final norm, prefix."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GLMBlock(config, i) for i in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        if config.pre_seq_len is not None:
            self.prefix_encoder = PrefixEncoder(prefix_shape(config))
            self.prefix_dropout = nn.Dropout(config.prefix_dropout)
        else:
            self.prefix_encoder = None
        self.gradient_checkpointing = False
        self._inv_freq_by_device: dict[torch.device, torch.Tensor] = {}
        self.post_init()

    def _inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq_by_device:
            self._inv_freq_by_device[device] = rotary_inv_freq(self.config.head_dim).to(device)
        return self._inv_freq_by_device[device]

    def get_input_embeddings(self):
        return self.word_embeddings

    def set_input_embeddings(self, value):
        self.word_embeddings = value

    def prefix_key_values(self, batch_size: int, dtype: torch.dtype) -> PrefixKV:
        """Per-layer prefix keys and values, each ``[B, N, P, D]`` in ``dtype`` (not rotated), dropped out
        per batch row in training, as the original."""
        return prefix_key_values(self.prefix_encoder, batch_size, dtype, self.prefix_dropout)

    def _masks_and_positions(self, input_ids, attention_mask, position_ids, past: int, batch: int, seq: int):
        """Returns ``hidden`` ``[B, 1, S, T]`` bool (True = hidden) or None, and ``[B, 2, S]`` positions."""
        cfg = self.config
        if attention_mask is not None and attention_mask.dim() == 4:
            if attention_mask.dtype != torch.bool:
                raise ValueError(
                    f"a 4D attention_mask must be bool with True = hidden (the original's format), got {attention_mask.dtype}"
                )
            if tuple(attention_mask.shape) != (batch, 1, seq, past + seq):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                    f"{(batch, 1, seq, past + seq)} ([batch, 1, new tokens, cached + new tokens])"
                )
            hidden = attention_mask
            if position_ids is None:
                raise ValueError("position_ids [B, 2, S] are required with a 4D attention_mask")
            return hidden, position_ids
        padding = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (batch, past + seq):
                raise ValueError(
                    f"2D attention_mask has shape {tuple(attention_mask.shape)}, expected {(batch, past + seq)} "
                    "([batch, cached + new tokens], 1 = real token)"
                )
            padding = attention_mask
        if past == 0:
            if input_ids is None:
                raise ValueError("input_ids are needed to build ChatGLM's mask and positions")
            hidden, built_positions = build_masks(input_ids, padding_mask=padding, **mask_token_ids(cfg))
            return hidden, built_positions if position_ids is None else position_ids
        if position_ids is None:
            raise ValueError(
                "position_ids [B, 2, S] are required when a cache is passed (generate() supplies them)"
            )
        if seq == 1 and (padding is None or bool(padding.all())):
            return None, position_ids
        ids = input_ids if input_ids is not None else torch.zeros(batch, seq, dtype=torch.long, device=padding.device
                                                                   if padding is not None else position_ids.device)
        return extend_step_masks(ids, past, padding_mask=padding), position_ids

    def _cache_as_prefix(self, cache: Cache, attention_mask, seq: int):
        """Reads a cache that arrives with a whole prompt and no positions as a prefix.

        peft's prefix tuning (``PeftModelForCausalLM.forward``) passes its P virtual tokens' keys and values,
        un-rotated like ours and laid out ``[B, N, P, D]`` per layer, as a pre-filled cache, and prepends P ones
        to a 2D mask. Read as earlier tokens they would shift every position and make the prompt causal; they
        are a prefix: always visible, and the masks and 2D positions come from the real ids alone. They go to
        every layer as its read-only prefix (after ours, if the model has one), which also keeps them under
        gradient checkpointing, where the layers drop caches. Returns the per-layer ``(key, value)`` and the
        mask without its prefix columns.
        """
        length = cache.get_seq_length()
        layers = list(getattr(cache, "layers", ()))
        if len(layers) != self.config.num_layers:
            raise ValueError(f"a prefix cache needs {self.config.num_layers} layers, got {len(layers)}")
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[1] != length + seq:
                raise ValueError(
                    f"with a prefix cache of {length} entries the attention_mask must be 2D [batch, {length} + {seq}], "
                    f"got {tuple(attention_mask.shape)}"
                )
            if not bool(attention_mask[:, :length].bool().all()):
                raise ValueError("the attention_mask hides part of the prefix cache; a prefix is always visible")
            attention_mask = attention_mask[:, length:]
        return [(layer.keys, layer.values) for layer in layers], attention_mask

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        prefix: PrefixKV | None = None,
        slot_cache=None,
        sequence_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """
        Args:
            input_ids: ``[B, S]``.
            attention_mask: None (built from the ids as the original model does), the HF padding mask
                ``[B, T]`` (1 = real token; pads hidden, positions start at the first real token, as the
                original tokenizer builds them), or the original bool ``[B, 1, S, T]`` (True = hidden).
            position_ids: ``[B, 2, S]`` (position, block position), or None to build them.
            cache: a transformers ``Cache`` holding rotated keys and values of earlier tokens (never the
                prefix, which is its own input to every layer). A non-empty cache given with several
                ``input_ids`` and no ``position_ids`` is a prefix instead (peft's prefix tuning), see
                :meth:`_cache_as_prefix`; the returned cache then holds the new tokens only.
            prefix: per-layer prefix keys/values ``[B, N, P, D]`` with an optional ``[B, P]`` visibility mask,
                used instead of the model's own prefix for this call (several prefixes in one batch; P = 0: none).
            slot_cache: a :class:`~ptuning.generation.SlotCache` of a decode loop of our own (then ``cache`` is not
                used). In its prefill the masks and positions are built as without a cache; in its decode step
                (one token per row) ``position_ids`` are required and the attention mask comes from the slots.
            sequence_ids: ``[B, S]`` for packed rows (see :mod:`ptuning.data.packing`): every row gets the 2D
                positions it has alone (:func:`~ptuning.models.chatglm.masks.build_packed_masks`) and attends one row
                per batch row with the mask it has alone (:class:`~ptuning.models.packed.PackedLayout`), seeing no
                other row (no ``attention_mask``, no cache).
        """
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)  # (B, S, H)
        batch, seq = inputs_embeds.shape[:2]
        dtype = inputs_embeds.dtype
        cache, cached_prefix, attention_mask = self._call_cache(
            cache, use_cache, input_ids, attention_mask, position_ids, seq, slot_cache, sequence_ids
        )
        past = cache.get_seq_length() if cache is not None else 0
        decoding = slot_cache is not None and slot_cache.mode == "decode"
        hidden_mask, position_ids, packed_layout = self._token_masks(
            input_ids, attention_mask, position_ids, past, batch, seq, decoding, sequence_ids
        )
        rotary = rotary_tables(position_ids, self._inv_freq(inputs_embeds.device), dtype)
        prefix = self._call_prefix(prefix, cached_prefix, batch, dtype)
        if decoding:
            attn_mask = uniform_rows = None  # the slots' own mask, applied in every layer
        else:
            attn_mask, uniform_rows = _layer_attention_mask(hidden_mask, prefix, packed_layout, batch, seq, past,
                                                            padded=attention_mask is not None)
        hidden, all_hidden = self._run_layers(
            inputs_embeds, prefix, output_hidden_states, rotary=rotary, attn_mask=attn_mask, cache=cache,
            uniform_rows=uniform_rows, slot_cache=slot_cache, packed_layout=packed_layout,
        )
        return BaseModelOutputWithPast(
            last_hidden_state=hidden,
            cache=cache,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
        )

    def _call_cache(self, cache, use_cache, input_ids, attention_mask, position_ids, seq: int, slot_cache,
                    sequence_ids):
        """The transformers cache this call reads and writes (None: none), the prefix that arrived as a cache
        (peft's prefix tuning, see :meth:`_cache_as_prefix`; else None) and the attention mask without its
        columns.

        No cache is kept under gradient checkpointing in training, for packed rows or with a slot cache (which
        is the cache then); a call that asks for one and brings none gets a new :class:`ChatGLMCache`.
        """
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if sequence_ids is not None:
            check_sequence_ids(sequence_ids, input_ids, attention_mask, cache if slot_cache is None else slot_cache)
            use_cache = False
        if slot_cache is not None:
            use_cache, cache = False, None
        cached_prefix = None
        if cache is not None and position_ids is None and input_ids is not None and seq > 1 and cache.get_seq_length():
            # peft's prefix tuning: its virtual tokens arrive as a cache, see _cache_as_prefix
            cached_prefix, attention_mask = self._cache_as_prefix(cache, attention_mask, seq)
            cache = None
        if use_cache and cache is None:
            cache = ChatGLMCache(self.config)
        if not use_cache:
            cache = None
        return cache, cached_prefix, attention_mask

    def _token_masks(self, input_ids, attention_mask, position_ids, past: int, batch: int, seq: int,
                     decoding: bool, sequence_ids):
        """ChatGLM's ``hidden`` mask of the tokens (True = hidden; ``[B, 1, S, T]``, packed rows ``[R, 1, W, W]``,
        or None: every key visible, or a slot cache's decode step, whose slots hold the mask), the positions
        ``[B, 2, S]`` and the packed rows' :class:`~ptuning.models.packed.PackedLayout` (None unless packed)."""
        if decoding:
            if position_ids is None:
                raise ValueError("position_ids [B, 2, 1] are required in a decode step of a slot cache")
            return None, position_ids, None
        if sequence_ids is not None:
            return self._packed_masks(input_ids, position_ids, sequence_ids)
        hidden_mask, position_ids = self._masks_and_positions(input_ids, attention_mask, position_ids, past, batch, seq)
        return hidden_mask, position_ids, None

    def _packed_masks(self, input_ids, position_ids, sequence_ids):
        """:meth:`_token_masks` of packed rows: every row's 2D positions as it has them alone, and attention one
        row per batch row, each with the mask it has alone (see :class:`~ptuning.models.packed.PackedLayout`)."""
        if input_ids is None:
            raise ValueError("input_ids are needed with sequence_ids to build each packed row's mask and positions")
        cfg = self.config
        special = mask_token_ids(cfg)
        _, built_positions = build_packed_masks(input_ids, sequence_ids, with_mask=False, **special)
        position_ids = built_positions if position_ids is None else position_ids
        packed_layout = PackedLayout(sequence_ids)
        hidden_mask, _ = build_masks(packed_layout.ids_rows(input_ids, cfg.pad_token_id), **special)  # (R, 1, W, W)
        return hidden_mask, position_ids, packed_layout

    def _call_prefix(self, prefix: PrefixKV | None, cached_prefix, batch: int, dtype: torch.dtype) -> PrefixKV | None:
        """The prefix of this call in ``dtype``: the one given (P = 0: none), else the model's own (dropped out
        in training), followed by a prefix that arrived as a cache (peft's); None without any."""
        if prefix is None and self.prefix_encoder is not None:
            prefix = self.prefix_key_values(batch, dtype)
        if prefix is not None and prefix.length == 0:
            prefix = None  # an explicit "no prefix"
        if prefix is not None and prefix.keys[0].dtype != dtype:
            prefix = PrefixKV([k.to(dtype) for k in prefix.keys], [v.to(dtype) for v in prefix.values], prefix.mask)
        if cached_prefix is not None:
            cached = PrefixKV([k.to(dtype) for k, _ in cached_prefix], [v.to(dtype) for _, v in cached_prefix])
            prefix = cached if prefix is None else _concat_prefixes(prefix, cached)
        return prefix

    def _run_layers(self, hidden: torch.Tensor, prefix: PrefixKV | None, output_hidden_states: bool | None,
                    **layer_inputs):
        """The blocks (each with its layer's prefix keys and values) and the final norm: the last hidden state
        ``[B, S, H]`` and, with ``output_hidden_states``, every block's input and the normed output."""
        all_hidden = [hidden] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            pk, pv = prefix.layer(i) if prefix is not None else (None, None)
            hidden = layer(hidden, pk, pv, **layer_inputs)
            if all_hidden is not None and i < len(self.layers) - 1:
                all_hidden.append(hidden)
        hidden = self.final_layernorm(hidden)
        if all_hidden is not None:
            all_hidden.append(hidden)
        return hidden, all_hidden


def prefix_shape(config: ChatGLMConfig, pre_seq_len: int | None = None, prefix_projection: bool | None = None) -> PrefixShape:
    """ChatGLM-6B's prefix: per layer keys and values for every head (no grouped-query attention); the
    projection embedding is ``hidden_size`` wide. Defaults: the config's ``pre_seq_len`` / ``prefix_projection``."""
    return PrefixShape(
        num_layers=config.num_layers,
        num_key_value_heads=config.num_attention_heads,
        head_dim=config.head_dim,
        pre_seq_len=config.pre_seq_len if pre_seq_len is None else pre_seq_len,
        prefix_projection=config.prefix_projection if prefix_projection is None else prefix_projection,
        hidden_size=config.hidden_size,
        embedding_dim=config.hidden_size,
    )


def _concat_prefixes(first: PrefixKV, second: PrefixKV) -> PrefixKV:
    """Two prefixes one after the other (ours, then peft's cached virtual tokens)."""
    mask = None
    if first.mask is not None or second.mask is not None:
        batch = first.keys[0].shape[0]
        ones = lambda p: torch.ones(batch, p, dtype=torch.bool, device=first.keys[0].device)  # noqa: E731
        mask = torch.cat([first.mask if first.mask is not None else ones(first.length),
                          second.mask if second.mask is not None else ones(second.length)], dim=1)
    return PrefixKV(
        [torch.cat([a, b], dim=2) for a, b in zip(first.keys, second.keys, strict=True)],
        [torch.cat([a, b], dim=2) for a, b in zip(first.values, second.values, strict=True)],
        mask,
    )


def _attention_mask(hidden_mask, prefix: PrefixKV | None, batch: int, seq: int, past: int, *,
                    rows_may_be_hidden: bool = True):
    """SDPA's bool mask ``[B, 1, S, P + T]`` (True = may attend) from ChatGLM's ``hidden`` mask ``[B, 1, S, T]``
    (True = hidden; None = every key visible) and the prefix's columns, and the rows that see no key at all.

    Prefix columns are visible to every row (the original) unless the prefix's own mask hides them. A row
    with no visible key gets a zero query and attends uniformly, exactly like the original's -10000 fill.
    Looking for such rows reads the mask on the host (a device sync); ``rows_may_be_hidden=False`` (masks built
    from the ids alone, where every token sees itself) skips it.
    """
    if hidden_mask is None and (prefix is None or prefix.mask is None):
        return None, None
    device = prefix.keys[0].device if hidden_mask is None else hidden_mask.device
    if hidden_mask is None:
        attn_mask = torch.ones(batch, 1, seq, past + seq, dtype=torch.bool, device=device)
    else:
        attn_mask = ~hidden_mask  # (B, 1, S, T)
    if prefix is not None:
        if prefix.mask is None:
            visible = attn_mask.new_ones(batch, 1, seq, prefix.length)
        else:
            visible = prefix.mask.to(device=device, dtype=torch.bool)[:, None, None, :].expand(batch, 1, seq, -1)
        attn_mask = torch.cat([visible, attn_mask], dim=-1)  # (B, 1, S, P + T)
    if not rows_may_be_hidden:
        return attn_mask, None
    full = ~attn_mask.any(dim=-1, keepdim=True)  # (B, 1, S, 1)
    if bool(full.any()):
        return attn_mask | full, full
    return attn_mask, None


def _layer_attention_mask(hidden_mask, prefix: PrefixKV | None, packed_layout: PackedLayout | None, batch: int,
                          seq: int, past: int, *, padded: bool):
    """The mask every block attends with (:func:`_attention_mask`): of the batch's rows, or with packed rows of
    the rows laid out one per batch row (``[R, 1, W, P + W]``; the prefix's own mask follows its pack's rows).

    Without a padding mask (``padded`` False) and in packed rows every token sees itself, so no row can be all
    hidden (no host sync to check)."""
    if packed_layout is None:
        return _attention_mask(hidden_mask, prefix, batch, seq, past, rows_may_be_hidden=padded)
    rows_prefix = prefix
    if prefix is not None and prefix.mask is not None:
        rows_prefix = PrefixKV(prefix.keys, prefix.values, packed_layout.per_row(prefix.mask))
    return _attention_mask(hidden_mask, rows_prefix, packed_layout.rows, packed_layout.width, 0,
                           rows_may_be_hidden=False)


class ChatGLMForConditionalGeneration(ChatGLMPreTrainedModel, GenerationMixin):
    """ChatGLM-6B with its output projection ``lm_head`` (untied), loss and ``generate()`` support."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        self.transformer = ChatGLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def prefix_key_values(self, batch_size: int, dtype: torch.dtype) -> PrefixKV | None:
        """The model's own prefix for a batch (per layer ``[B, N, P, D]`` in ``dtype``), or None without one."""
        if self.transformer.prefix_encoder is None:
            return None
        return self.transformer.prefix_key_values(batch_size, dtype)

    def cache_shape(self) -> tuple[int, int, int]:
        """``(N, D, L)``: every attention head keeps its keys and values (no grouped-query attention)."""
        shape = prefix_shape(self.config, 0)
        return shape.num_key_value_heads, shape.head_dim, shape.num_layers

    def store_lm_head_column_major(self) -> None:
        """On a CPU, stores ``lm_head.weight`` (shape ``[V, H]``, its checkpoint key and shape unchanged)
        column-major. Decoding multiplies one row by it, and BLAS runs that matrix-vector product about twice
        as fast over the transposed layout; it is the largest weight a token reads. Done on the first
        ``generate()`` rather than at load: DeepSpeed's engine needs contiguous parameters.

        A weight on any other device is left as it is: the trick is a CPU BLAS one, and the copy it makes would
        briefly double a ~1 GB layer on a GPU (also inside training's evaluation)."""
        weight = self.lm_head.weight
        tied = weight is self.transformer.word_embeddings.weight
        if weight.device.type == "cpu" and not tied and weight.is_contiguous() and weight.dim() == 2:
            weight.data = weight.data.t().contiguous().t()

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        dtype: torch.dtype | str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        **config_overrides,
    ) -> ChatGLMForConditionalGeneration:
        """Loads a ChatGLM-6B folder (``config.json`` + weights in any supported layout).

        The backbone is cast to ``dtype`` (default: the config's ``torch_dtype``, else float32); the
        prefix encoder stays float32. ``config_overrides`` (e.g. ``pre_seq_len=128``) update the config;
        a prefix that the checkpoint lacks is freshly initialised. Missing backbone keys, shape
        mismatches and unknown keys raise :class:`CheckpointError` naming the key and both shapes.
        """
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{path}: no config.json (expected a ChatGLM-6B model folder)")
        try:
            config = ChatGLMConfig.from_pretrained(str(path), **config_overrides)
        except Exception as err:  # noqa: BLE001 - surface the config problem with its file
            raise CheckpointError(f"{config_file}: {str(err).strip().splitlines()[-1].strip()}") from None
        dtype = dtype or torch_dtype or config.dtype or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        with torch.device("meta"):
            model = cls(config)
        expected = model.state_dict()
        loaded: set[str] = set()
        unexpected: list[str] = []
        for file, shard in iter_shards(path):
            mapped = file.suffix == ".bin"  # read_weights maps .bin files
            part = {}
            for key, tensor in shard.items():
                if IGNORED_KEYS.match(key):
                    continue
                if key not in expected:
                    unexpected.append(f"{key} ({file.name})")
                    continue
                if tuple(tensor.shape) != tuple(expected[key].shape):
                    raise CheckpointError(
                        f"{file}: '{key}' has shape {list(tensor.shape)} but the model built from "
                        f"{config_file} expects {list(expected[key].shape)}"
                    )
                part[key] = converted(tensor, torch.float32 if is_prefix_param(key) else dtype, mapped=mapped)
            model.load_state_dict(part, strict=False, assign=True)
            loaded.update(part)
            del shard, part
        if unexpected:
            hint = " (the checkpoint has a prefix: pass pre_seq_len)" if any(is_prefix_param(k) for k in unexpected) else ""
            raise CheckpointError(f"{path}: unexpected key(s) {', '.join(unexpected[:5])}{hint}")
        missing = [k for k in expected if k not in loaded]
        if "lm_head.weight" in missing and "transformer.word_embeddings.weight" in loaded:
            model.lm_head.weight = model.transformer.word_embeddings.weight  # the original ties them
            missing.remove("lm_head.weight")
        backbone_missing = [k for k in missing if not is_prefix_param(k)]
        if backbone_missing:
            raise CheckpointError(
                f"{path}: missing key(s) {', '.join(backbone_missing[:5])}"
                + (f" and {len(backbone_missing) - 5} more" if len(backbone_missing) > 5 else "")
            )
        if missing:  # a fresh prefix for a base checkpoint
            encoder = model.transformer.prefix_encoder
            encoder.to_empty(device="cpu")
            model._init_weights(encoder)
            encoder.float()
        model.name_or_path = str(path)
        model.config.dtype = dtype
        cast_backbone(model, dtype)
        if device is not None:
            model.to(device)
        return model.eval()

    def save_pretrained(
        self, save_directory: str | os.PathLike, *, safe_serialization: bool = True, max_shard_size: int | None = None, **_
    ) -> None:
        """Writes ``config.json`` and the weights under the original keys (sharded above ``max_shard_size`` bytes)."""
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        self.config.architectures = [type(self).__name__]
        self.config.save_pretrained(str(save_directory))
        save_weights(self.state_dict(), save_directory, safe=safe_serialization, max_shard_bytes=max_shard_size)

    def get_input_embeddings(self):
        return self.transformer.word_embeddings

    def set_input_embeddings(self, value):
        self.transformer.word_embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

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
        output_hidden_states: bool | None = None,
        logits_to_keep: int = 0,
        loss_reduction: str = "mean",
        return_logits: bool = True,
        prefix: PrefixKV | None = None,
        slot_cache=None,
        sequence_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits ``[B, S, V]`` (the last ``logits_to_keep`` positions when > 0) and, with ``labels``
        ``[B, S]`` (-100 = ignored), the next-token loss over all target tokens of the batch: their mean,
        or their sum with ``loss_reduction="sum"``. With ``return_logits=False`` the output projection
        runs only at the positions that predict a target (training needs nothing else; the prompt's
        logits are most of the memory and a large share of the compute). ``prefix`` replaces the model's own
        prefix for this call, ``slot_cache`` is a decode loop's cache, ``sequence_ids`` mark packed rows (see
        :meth:`ChatGLMModel.forward`)."""
        out = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            prefix=prefix,
            slot_cache=slot_cache,
            sequence_ids=sequence_ids,
        )
        logits, loss = project_and_loss(self.lm_head, out.last_hidden_state, labels, loss_reduction,
                                        return_logits=return_logits, logits_to_keep=logits_to_keep)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states
        )

    # ---- generation: the original's 2D positions and masks on top of transformers' generate ----

    def generate(self, inputs=None, generation_config=None, **kwargs):
        """transformers ``generate`` with ChatGLM's masks and 2D positions.

        ``input_ids`` alone decode as the original model does (pads visible); an HF padding mask
        ``[B, S]`` or the original tokenizer's bool ``[B, 1, S, S]`` mask hide the pads as the original
        tokenizer's batches do. A 4D mask is reduced to its padding (its last row), which is exact for
        masks the tokenizer builds.
        """
        # peft's generate() installs its own prepare_inputs_for_generation; for prompt learning it adds its
        # virtual-token count to our [B, 2, S] positions and hands the prefix under a name that generate's own
        # cache overrides, so the result would be silently wrong: refuse, and say what works instead.
        peft_owner = getattr(self.__dict__.get("prepare_inputs_for_generation"), "__self__", None)
        if getattr(getattr(peft_owner, "active_peft_config", None), "is_prompt_learning", False):
            raise RuntimeError(
                "generate() through a peft prompt-learning adapter is not supported for ChatGLM (peft shifts its 2D "
                "position ids): load the adapter as a native prefix (ptuning.interop.peft.load_peft_prefix, or "
                "`python -m ptuning.export from-peft`) and generate with the model itself"
            )
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 4:
            kwargs["attention_mask"] = (~mask[:, 0, -1, :]).long()  # (B, S): 1 = real token
        self.store_lm_head_column_major()
        use_cache = kwargs.get("use_cache", getattr(generation_config, "use_cache", True))
        if use_cache is not False and kwargs.get("cache") is None and kwargs.get("past_key_values") is None:
            kwargs["cache"] = ChatGLMCache(self.config)  # no per-token concatenation, room for the prefix
        return super().generate(inputs, generation_config=generation_config, **kwargs)

    def _prepare_attention_mask_for_generation(self, inputs_tensor, generation_config, model_kwargs):
        # The original never derives a padding mask from pad ids: without a mask, pads stay visible.
        # (An all-ones mask is dropped by generate() before the first forward.)
        return torch.ones(inputs_tensor.shape[:2], dtype=torch.long, device=inputs_tensor.device)

    def prompt_position_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Positions ``[B, 2, S]`` of a (left-padded) prompt batch, as the original tokenizer builds them."""
        _, positions = build_masks(input_ids, padding_mask=attention_mask, **mask_token_ids(self.config))
        return positions

    @staticmethod
    def next_position_ids(last: torch.Tensor) -> torch.Tensor:
        """Positions ``[B, 2, 1]`` of the token after one at ``last`` ``[B, 2, 1]``: the mask position stays,
        the block position counts up (the original's ``prepare_inputs_for_generation``)."""
        nxt = last.clone()
        nxt[:, 1] += 1
        return nxt

    def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs):
        input_ids = model_kwargs.get("input_ids", inputs_tensor)
        return self.prompt_position_ids(input_ids, model_kwargs.get("attention_mask"))  # (B, 2, S)

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        # our position ids are [B, 2, S]: batch first (transformers assumes dim 1 for 3D positions)
        positions = model_kwargs.pop("position_ids", None)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        if positions is not None:
            model_kwargs["position_ids"] = positions.repeat_interleave(expand_size, dim=0)
        return input_ids, model_kwargs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1):
        positions = model_kwargs.pop("position_ids", None)
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )
        if positions is not None:
            # new tokens keep the mask position (row 0) and count up inside the block (row 1)
            step = torch.arange(1, num_new_tokens + 1, device=positions.device)
            new = positions[..., -1:].expand(-1, -1, num_new_tokens).clone()  # (B, 2, n)
            new[:, 1] += step
            model_kwargs["position_ids"] = torch.cat([positions, new], dim=-1)
        return model_kwargs
