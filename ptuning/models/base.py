"""The seam between the toolkit and a model family, as code: :class:`Family` (the family object) and
:class:`PrefixTunedModel` (the model it loads).

A family (ChatGLM-6B, ChatGLM2/3, transformers' own decoders) answers a few questions — load the model and
the tokenizer from a folder, turn rows and conversations into token ids, the shape of its prefix, how long a
sequence may be, how its weights are exported and what a train step holds in memory — and the training loop,
evaluation, chat, the server, memory estimates and the exports ask only these. Nothing outside a family's
package knows its specifics.

The contract is executable: ``isinstance(model, PrefixTunedModel)`` checks that a loaded model has every hook
(``typing.runtime_checkable``), the signatures are there for a type checker, and ``tests/test_family_contract.py``
runs the same checks (load, prefix shape, template, train step with and without gradient checkpointing,
packed rows against the same rows unpacked, the decode loop against ``generate()``, save / load, the export
hooks, the FLOP and memory hooks) over every family and its built-in tiny model. ``docs/adding-a-family.md`` says how a new family joins.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from ..errors import ConfigError
from ..prefix import PrefixKV, PrefixShape
from ..weights import CheckpointError
from .loss import IGNORE_INDEX  # noqa: F401 - the templates and the data read it from here

if TYPE_CHECKING:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from .memory import ArchitectureMemory


@dataclass
class PromptIds:
    """A prompt as token ids, with what had to go to fit its budget.

    Attributes:
        ids: the prompt, with the family's special tokens, ending where the answer starts.
        dropped_turns: earlier turns left out (oldest first) to fit.
        truncated_tokens: tokens cut from the current query itself (it alone did not fit).
    """

    ids: list[int]
    dropped_turns: int = 0
    truncated_tokens: int = 0


@dataclass
class TrainRow:
    """One training row: ``input_ids`` and ``labels`` of the same length (-100 = not a target).

    ``dropped_turns`` and ``truncated_tokens`` are what the prompt lost (see :class:`PromptIds`);
    ``truncated_answer_tokens`` the response tokens cut to fit ``max_target_length``.
    """

    input_ids: list[int]
    labels: list[int]
    dropped_turns: int = 0
    truncated_tokens: int = 0
    truncated_answer_tokens: int = 0


@dataclass
class Conversation:
    """A prompt–response–history row or a chat request, family-neutral.

    Attributes:
        query: the current user message.
        history: earlier ``(user, assistant)`` turns, oldest first.
        system: a system message (a family whose template has none, ``renders_system = False``, refuses it).
        source_prefix: text put in front of the rendered prompt (``data.source_prefix``).
        plain: a row of a data set without a history column (ADGEN): a family with a chat template renders it
            as plain prompt -> response instead (the query as it is, after the tokenizer's own leading special
            tokens). Chat requests and rows of data with a history column are not plain.
        extra: family-specific messages (e.g. ChatGLM3's tool ``observation`` turns), as ``{"role", "content"}``
            dicts in order; only families that understand them accept them.
        tools: tool definitions offered to the model (ChatGLM3 writes them into its system message); only
            families that understand them accept them.
    """

    query: str
    history: Sequence[tuple[str, str]] = ()
    system: str | None = None
    source_prefix: str = ""
    plain: bool = False
    extra: list[dict[str, Any]] = field(default_factory=list)
    tools: Any = None


#: the roles of a chat-format row (ChatGLM3's, with finetune_demo's ``tool`` entries)
MESSAGE_ROLES = ("system", "user", "assistant", "tool", "observation")


def conversation_from_messages(messages: Sequence[Any], tools: Any = None) -> tuple[Conversation, str]:
    """A chat-format row (a list of ``{"role", "content", ...}`` messages, as ChatGLM3's ``finetune_demo``
    data) as a :class:`Conversation` and its answer.

    The last message is the answer (role ``assistant``); the last ``user`` message before it is the query;
    the messages between them (e.g. tool calls and their ``observation`` results) become ``extra`` as they
    are; earlier messages are an optional leading ``system`` message and then ``user`` / ``assistant`` pairs.

    Raises:
        ValueError: a layout this cannot express, naming the message.
    """
    if not isinstance(messages, list | tuple) or not messages:
        raise ValueError("expected a non-empty list of messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"message {i} is not an object with a 'role'")
        if message["role"] not in MESSAGE_ROLES:
            raise ValueError(f"message {i}: role {message['role']!r}: expected one of {', '.join(MESSAGE_ROLES)}")
        if message["role"] != "tool" and not isinstance(message.get("content"), str):
            raise ValueError(f"message {i} ({message['role']}): 'content' must be a string")
    items = list(messages)
    if items[-1]["role"] != "assistant":
        raise ValueError(f"the last message must be the assistant's answer, got role {items[-1]['role']!r}")
    answer = items.pop()["content"]
    system = items.pop(0)["content"] if items and items[0]["role"] == "system" else None
    users = [i for i, m in enumerate(items) if m["role"] == "user"]
    if not users:
        raise ValueError("no user message before the answer")
    last = users[-1]
    earlier = items[:last]
    roles = [m["role"] for m in earlier]
    if roles != ["user", "assistant"] * (len(earlier) // 2):
        raise ValueError(
            f"messages before the last user message must alternate user, assistant; got {', '.join(roles)} "
            "(tool turns only in the last exchange)"
        )
    history = [(q["content"], a["content"]) for q, a in zip(earlier[::2], earlier[1::2], strict=True)]
    extra = [dict(m) for m in items[last + 1:]]
    return Conversation(query=items[last]["content"], history=history, system=system, extra=extra, tools=tools), answer


def drop_oldest_turns(
    history: Sequence[tuple[str, str]], max_tokens: int, render: Callable[[Sequence[tuple[str, str]]], list[int]]
) -> tuple[list[int] | None, int]:
    """The one truncation rule's first half: whole oldest turns go first.

    Args:
        history: earlier ``(user, assistant)`` turns, oldest first.
        max_tokens: the budget.
        render: the prompt ids for a given (shortened) history, the current query always included.

    Returns:
        ``(ids, dropped)`` for the longest suffix of ``history`` that fits, or ``(None, len(history))`` when
        even the current query alone does not fit (the caller then cuts the query).
    """
    for dropped in range(len(history) + 1):
        ids = render(history[dropped:])
        if len(ids) <= max_tokens:
            return ids, dropped
    return None, len(history)


def keep_query_start(query: str, length: Callable[[str], int], max_tokens: int) -> int:
    """The rule's second half: the largest ``end`` such that the prompt with ``query[:end]`` fits. A question
    that alone does not fit keeps its start, in every family, as the original P-Tuning v2 scripts of ChatGLM-6B,
    ChatGLM2-6B and ChatGLM3-6B (``finetune_demo``) all cut an over-long input (they keep its first tokens);
    the template's frame around the question (``答：``, ``<|assistant|>``, the generation prompt) stays.

    The query is cut on characters and the whole prompt re-encoded, so the kept part tokenizes exactly as it
    would in place.

    Args:
        length: prompt length in tokens for a given (cut) query.
    """
    lo, hi = 0, len(query)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if length(query[:mid]) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    return lo


def drop_incomplete_end(text: str) -> str:
    """``text`` without the U+FFFD at its very end: decoded answer ids end in them when the answer was cut (by
    ``max_new_tokens``) between the byte pieces of one character, which is then no character at all (a
    SentencePiece byte fallback gives one U+FFFD per byte, a byte-level BPE one in all). The chat command, the
    server and evaluation all drop them; a U+FFFD inside the answer (a byte sequence the model never
    completed) stays, as the tokenizer decodes it."""
    return text.rstrip("\ufffd")


class PromptTemplate(ABC):
    """How one family turns conversations into token ids, for training, evaluation, chat and serving alike.

    The truncation rule is the same everywhere: whole oldest turns go first; the current query's turn is
    always kept; only if it alone does not fit is the query itself cut, keeping its start (see
    :func:`keep_query_start`).
    """

    tokenizer: Any
    #: the template writes ``Conversation.system`` into the prompt (its own system turn, or in front of the
    #: first query); False: it has no place for one, and ``check`` refuses a conversation that has one
    renders_system: ClassVar[bool] = True
    #: the family's original script turned every label equal to the pad id into -100 after padding (its
    #: ``ignore_pad_token_for_loss``), which besides its padding also drops a pad token written in an answer's
    #: text; True keeps that for the answer's text (ChatGLM-6B, whose pad id is never its end token). Padding is
    #: masked by position (the collator) and a row's end token is a target whatever the pad id is
    #: (:func:`ptuning.data.features.preprocess_train`).
    ignores_pad_id_in_answers: ClassVar[bool] = False

    @abstractmethod
    def prompt(self, conversation: Conversation, max_tokens: int) -> PromptIds:
        """The generation prompt (ending where the answer starts), at most ``max_tokens`` ids."""

    @abstractmethod
    def train_row(
        self, conversation: Conversation, response: str, max_source_length: int, max_target_length: int
    ) -> TrainRow:
        """Prompt and response as one training row; the response and the token that ends it (eos,
        ``<|im_end|>``, ``<|user|>``: what the family's answers end with) are the targets, also when that
        token's id is the pad id."""

    def generation_budget(self, max_source_length: int) -> int:
        """The prompt budget of evaluation for a ``data.max_source_length`` (family-specific, as its
        original P-Tuning v2 script)."""
        return max_source_length

    @property
    @abstractmethod
    def stop_token_ids(self) -> list[int]:
        """Ids that end an answer."""

    def render_text(self, conversation: Conversation) -> str:
        """The whole prompt as text (prediction files, ``--show-prompt``): its ids decoded, special tokens kept."""
        return self.tokenizer.decode(self.prompt(conversation, 1 << 30).ids, skip_special_tokens=False)

    def check(self, conversation: Conversation) -> str | None:
        """Why this template cannot render ``conversation`` (one line), or None. Data loading asks it of every
        chat-format row, so that such a row is reported by file and line like any other bad row (and skipped
        with ``data.skip_bad_rows``). Default: tools and tool / observation turns are refused, being ChatGLM3's
        format (:class:`~ptuning.models.chatglm2.template.ChatGLM3Template` takes them)."""
        if conversation.extra or conversation.tools is not None:
            return (
                "tools and tool / observation turns are ChatGLM3-6B's (finetune_demo) format; this model's "
                "template has none (use ChatGLM3-6B, or drop them)"
            )
        return None

    @property
    def pad_token_id(self) -> int:
        """The id that pads a batch: right of training rows (their labels there are -100) and left of
        generation prompts (masked out); the tokenizer's ``pad_token_id``."""
        return self.tokenizer.pad_token_id

    def decode(self, ids: Sequence[int]) -> str:
        """Answer text of generated ids (special tokens dropped, and a character cut off at the end: see
        :func:`drop_incomplete_end`)."""
        return drop_incomplete_end(self.tokenizer.decode(list(ids), skip_special_tokens=True)).strip()

    @property
    def control_token_ids(self) -> list[int]:
        """Ids that are never answer text (the server leaves them out of its answers): the tokenizer's special
        tokens."""
        return list(getattr(self.tokenizer, "all_special_ids", []))

    def max_chars_per_token(self) -> int | None:
        """The most characters of prompt text one token can stand for (the longest vocabulary piece), or None
        when that is unknown. A text of more than ``n`` times that many characters cannot fit in ``n``
        tokens, which lets the server refuse a huge prompt without tokenizing it."""
        tokenizer = self.tokenizer
        try:
            pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        except Exception:  # noqa: BLE001 - a tokenizer without the usual API: no bound
            return None
        # a SentencePiece piece spells its characters (``▁`` one space; byte pieces ``<0xE4>`` more than
        # theirs); a byte-level BPE piece has one character per byte, at least one per character it stands for
        return max((len(p) for p in pieces if isinstance(p, str)), default=None)


@runtime_checkable
class PrefixTunedModel(Protocol):
    """What the model a family loads (:meth:`Family.load_model`) must do: a transformers ``PreTrainedModel``
    with ``GenerationMixin`` and these hooks. The training loop calls ``forward`` with labels; the decode loop
    (:mod:`ptuning.generation`: evaluation, chat, the server) calls the position, prefix and cache hooks;
    ``generate()`` runs only for beam search (``num_beams`` > 1, :func:`ptuning.evaluation.generate.generate_ids`)
    and as the reference the contract test compares the decode loop with.

    Its prefix encoder (with ``pre_seq_len``) is a float32 :class:`~ptuning.prefix.PrefixEncoder` somewhere in
    the module tree under the attribute name ``prefix_encoder`` (:func:`ptuning.prefix.prefix_module_name` finds
    it, :func:`ptuning.prefix.is_prefix_param` decides what trains and what is saved); the prefix is never
    written into a cache.

    Shapes: B batch, S tokens, P prefix length, G key/value heads, D head size, L layers, V vocabulary.
    """

    config: Any

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        loss_reduction: str = "mean",
        return_logits: bool = True,
        prefix: PrefixKV | None = None,
        slot_cache: Any = None,
        sequence_ids: torch.Tensor | None = None,
    ) -> CausalLMOutputWithPast:
        """Logits and loss of a batch, the prefix in every attention layer.

        Args:
            input_ids: ``[B, S]``.
            attention_mask: ``[B, cached + S]`` (1 = real token) or None; right-padded training batches need
                none (pads come after the end token and carry -100).
            position_ids: the family's own form (``[B, S]``, ChatGLM-6B's ``[B, 2, S]``) or None.
            cache: a transformers ``Cache`` of the tokens (never the prefix); with ``use_cache`` and a prefix of
                length 0 its ``layers[i].keys`` / ``.values`` are the text's own keys and values
                (``model.prefix_init=text`` reads them).
            labels: ``[B, S]`` (-100 = ignored): the loss is :func:`ptuning.models.loss.project_and_loss`'s, the
                next-token cross-entropy in float32 over every target of the batch (their mean, or their sum
                with ``loss_reduction="sum"``).
            return_logits: False with labels: no logits, the output projection only at the positions that
                predict a target, the fused loss (the training loop's call).
            prefix: replaces the model's own prefix for this call (per-row prefixes when serving); a prefix of
                length 0 means none (not the model's own).
            slot_cache: a decode loop's :class:`~ptuning.generation.SlotCache`: the model's own cache is off,
                every layer stores its new keys and values in the slots and, in the cache's decode step (one
                token per row, explicit ``position_ids``), attends over the prefix and the row's cached tokens
                with the cache's mask.
            sequence_ids: ``[B, S]`` for packed training rows (:mod:`ptuning.data.packing`: the rows of each
                sequence numbered 0, 1, ..., the padding after them -1; no ``attention_mask``, no cache): every row
                computes what it computes alone, its positions from 0 and its attention over the prefix and its
                own tokens only, so the summed loss is the rows' unpacked.

        Returns:
            ``CausalLMOutputWithPast`` with ``loss``, ``logits`` ``[B, S, V]`` (None with
            ``return_logits=False``) and ``cache``.
        """
        ...

    def __call__(self, *args: Any, **kwargs: Any) -> CausalLMOutputWithPast: ...

    def generate(self, inputs: torch.Tensor | None = None, generation_config: Any = None, **kwargs: Any) -> Any:
        """transformers' ``generate``; works for left-padded batches with ``attention_mask`` ``[B, S]``."""
        ...

    def prompt_position_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The positions of a left-padded prompt batch in the family's own form (``[B, S]``, ChatGLM-6B's
        ``[B, 2, S]``), as ``generate()`` numbers them."""
        ...

    def next_position_ids(self, last: torch.Tensor) -> torch.Tensor:
        """The positions of the token after one at ``last`` (the last column of those positions)."""
        ...

    def prefix_key_values(self, batch_size: int, dtype: torch.dtype) -> PrefixKV | None:
        """The model's own prefix for a batch (per layer ``[B, G, P, D]`` in ``dtype``, dropout applied in
        training), or None without a prefix encoder."""
        ...

    def cache_shape(self) -> tuple[int, int, int]:
        """``(G, D, L)``: key/value heads, head size and layers of the attention, the shape of a decode loop's
        slot cache (the prefix's shape too)."""
        ...

    def store_lm_head_column_major(self) -> None:
        """Prepares the output projection for one-token decode steps (the decode loop and ``generate()`` call
        it once before decoding); a no-op where nothing is faster."""
        ...

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None) -> None:
        """Gradient checkpointing of every layer, the prefix's gradient intact (non-reentrant)."""
        ...

    def get_input_embeddings(self) -> nn.Module:
        """The token embedding; its weight's dtype is the compute dtype of the backbone."""
        ...


def check_vocab_size(tokenizer, folder: Path, vocab_size: int | None, key: str = "vocab_size"):
    """``tokenizer``, once it is known to fit the model's embedding rows (every family's
    :meth:`Family.load_tokenizer` asks this).

    Args:
        tokenizer: the loaded tokenizer (``len(tokenizer)``: its tokens, added ones included).
        folder: the model folder it came from, for the message.
        vocab_size: the model's embedding rows (None: not checked).
        key: the config key that sets them, for the message (ChatGLM2/3: ``padded_vocab_size``).

    Returns:
        ``tokenizer`` itself (fewer tokens than rows is fine: the extra rows are never produced as text).

    Raises:
        ConfigError: the tokenizer has more tokens than the model has rows (one line naming the folder).
    """
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise ConfigError(f"{folder}: the tokenizer has {len(tokenizer)} tokens but the model's {key} is {vocab_size}")
    return tokenizer


class Family(ABC):
    """One model family: the hooks the toolkit asks, grouped by who asks. Subclasses are registered in
    :data:`ptuning.models.FAMILIES` (one row: which ``config.json`` it takes and where its class lives).

    Abstract methods every family implements; the others have a default that says "not supported" (or the
    generic answer), which a family overrides where it has more to say.
    """

    #: recorded as ``family`` in every checkpoint's ``prefix_config.json`` (never change it)
    name: ClassVar[str]
    #: what a user calls it in messages
    label: ClassVar[str]

    # ---- loading (build.load, evaluation, chat, the server, export, memory) ----

    @abstractmethod
    def load_model(self, folder: Path, *, dtype, pre_seq_len: int | None, prefix_projection: bool,
                   prefix_dropout: float, device=None) -> PrefixTunedModel:
        """The frozen backbone in ``dtype`` with a float32 prefix of ``pre_seq_len`` (None = no prefix), a
        :class:`PrefixTunedModel`.

        Raises:
            CheckpointError: the folder's config or weights cannot be loaded (names the file and key).
        """

    @abstractmethod
    def model_config(self, folder: Path) -> Any:
        """The config :meth:`load_model` would give the model (``model.config``), read without the weights (the
        server sizes its generation cache before loading; exports read the base model's sizes).

        Raises:
            CheckpointError: no or unreadable ``config.json``, or values the family cannot represent.
        """

    @abstractmethod
    def load_tokenizer(self, folder: Path, vocab_size: int | None = None) -> Any:
        """The tokenizer of the folder (checked against the model's ``vocab_size`` when given, see
        :func:`check_vocab_size`).

        Raises:
            ConfigError: no usable tokenizer files, or more tokens than the model's ``vocab_size``.
        """

    def describe(self, model_config=None) -> str:
        """What a user calls a model of this family in messages (default :attr:`label`)."""
        return self.label

    # ---- prompts (data, evaluation, chat, the server) ----

    @abstractmethod
    def template(self, tokenizer, model_config) -> PromptTemplate:
        """The prompt template of this family."""

    @abstractmethod
    def max_positions(self, model_config) -> int:
        """The longest sequence (prompt + answer) the model's positions cover."""

    # ---- the prefix and checkpoints (build, checkpoints, the server's prefix bank) ----

    @abstractmethod
    def prefix_shape(self, model_config, pre_seq_len: int, prefix_projection: bool) -> PrefixShape:
        """The prefix that fits ``model_config`` (``pre_seq_len`` 0: the attention's shape alone)."""

    def text_prefix_input(self, tokenizer, ids: list[int]) -> list[int]:
        """The input that ``model.prefix_init=text`` runs to read the model's keys and values of the text
        ``ids`` (they sit at its first ``len(ids)`` positions). Default: the ids themselves."""
        return list(ids)

    def text_prefix_positions(self, length: int) -> list[int] | None:
        """The positions at which ``model.prefix_init=text`` runs its input of ``length`` ids; None (default):
        the model's own (0, 1, ...)."""
        return None

    def fingerprint_keys(self, model_config) -> dict:
        """The config values that decide what the backbone computes (recorded with every checkpoint)."""
        return {}

    def fingerprint(self, model_config) -> str:
        """A hash of :meth:`fingerprint_keys` and the family's name (``base_config_fingerprint``)."""
        blob = json.dumps({"family": self.name, **self.fingerprint_keys(model_config)}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    # ---- performance and memory (the training loop's MFU, CPU threads, quantization, ptuning.memory) ----

    def matmul_weights(self, model_config) -> int:
        """Matmul weights one token passes through (embeddings excluded), for FLOP counts."""
        return 0

    def block_linear_names(self) -> tuple[str, ...]:
        """Names (last attribute) of the per-layer linears that weight-only quantization replaces."""
        return ()

    def train_memory(self) -> ArchitectureMemory | None:
        """The formulas of :mod:`ptuning.memory` for this family's architecture (weight bytes, the
        activations a train step keeps), or None when ``python -m ptuning.memory`` has none for it."""
        return None

    # ---- export (python -m ptuning.export, ptuning.interop) ----

    def export_unsupported(self, kind: str) -> str | None:
        """Why ``python -m ptuning.export <kind>`` (``peft``, ``from-peft``, ``original``, ``full``) cannot carry
        this family's prefix (one line), or None when it can.

        The default refuses every kind, since the other defaults cannot do them: peft's ``PREFIX_TUNING``
        feeds the prefix as P cached tokens and shifts the real tokens' positions by P (a different model
        wherever positions are rotary), :meth:`original_prefix_key` has no key and :meth:`export_full`
        raises. A family overrides this for the kinds it carries (and the hooks those kinds use).
        """
        if kind in ("peft", "from-peft"):
            return (
                f"peft's PREFIX_TUNING feeds the prefix as P cached tokens and shifts the positions of the real tokens "
                f"by P; {self.label} does not say that this computes its prefix"
            )
        if kind == "original":
            return f"{self.label} has no original P-Tuning v2 prefix format (its prefix stays in prefix.safetensors)"
        if kind == "full":
            return f"{self.label} has no original full-model layout to export to"
        return f"'{kind}' is not an export (peft, from-peft, original or full)"

    def original_prefix_key(self, local_key: str) -> str | None:
        """The key under which the family's original P-Tuning v2 code saves a prefix weight (``local_key`` is
        the key inside the encoder, e.g. ``embedding.weight``), for ``python -m ptuning.export original``;
        None: the family has no original prefix format (export a peft adapter instead)."""
        return None

    def export_full(self, model: nn.Module, out_dir: Path, *, dtype, max_shard_bytes: int,
                    companions_from: Path | None = None) -> list[Path]:
        """Writes backbone and prefix as one model folder in the family's original layout (``python -m
        ptuning.export full``). Returns the weight files.

        Raises:
            CheckpointError: the family has no original layout, or the model cannot be written (e.g. quantized).
        """
        raise CheckpointError(f"{self.label} has no original full-model layout to export to")
