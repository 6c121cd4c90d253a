"""The seam between the toolkit and a model family.

A family (ChatGLM-6B, ChatGLM2/3, transformers' own decoders) answers a few questions — load the model and
the tokenizer from a folder, turn rows and conversations into token ids, the shape of its prefix, how long a
sequence may be — and the training loop, evaluation, chat and the server ask only these. Nothing outside a
family's package knows its specifics.

The model a family loads (:meth:`Family.load_model`) is a transformers ``PreTrainedModel`` with
``GenerationMixin`` that keeps these promises:

* ``model.forward(input_ids [B, S], attention_mask [B, S] (1 = real token) | None, position_ids | None,
  labels [B, S] | None (-100 = ignored), loss_reduction="mean" | "sum", return_logits=True,
  prefix: PrefixKV | None, past_key_values, use_cache, ...)`` returns a ``CausalLMOutputWithPast``. With
  labels the loss is the next-token cross-entropy in float32 over every target token of the batch (their
  mean, or their sum); ``return_logits=False`` projects only the positions that predict a target.
  Right-padded training batches need no mask (pads come after the end token and carry -100).
* Its prefix encoder (if ``pre_seq_len``) is a :class:`~ptuning.prefix.PrefixEncoder` somewhere in the
  module tree under the attribute name ``prefix_encoder`` (float32); :func:`ptuning.prefix.is_prefix_param`
  finds it. ``prefix`` given to ``forward`` replaces the model's own prefix for that call (per-row
  prefixes when serving); the prefix is never written into the cache.
* ``model.generate(input_ids, attention_mask=...)`` works for left-padded batches.
* For decode loops of our own (:mod:`ptuning.generation`: evaluation, chat, the server):
  ``model.prompt_position_ids(input_ids, attention_mask)`` gives the positions of a left-padded prompt batch in
  the family's own form (``[B, S]``, or ChatGLM-6B's 2D ``[B, 2, S]``), and ``model.next_position_ids(last)``
  the positions of the token after one at ``last`` (the last column of those positions);
  ``model.prefix_key_values(batch_size, dtype)`` the model's own prefix (a ``PrefixKV``, None without one);
  ``forward(..., slot_cache=SlotCache, use_cache=False)`` stores every layer's new keys and values in the
  slot cache (the model's own cache off) and, in the cache's decode step (one token per row, explicit
  ``position_ids``), attends over the prefix and each row's cached tokens with the cache's mask. A
  ``prefix`` of length 0 means no prefix (not the model's own).
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from ..prefix import PrefixShape

IGNORE_INDEX = -100


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


def cut_query_from_left(query: str, length: Callable[[str], int], max_tokens: int) -> int:
    """The rule's second half: the smallest ``start`` such that the prompt with ``query[start:]`` fits.

    The query is cut on characters and the whole prompt re-encoded, so the kept part tokenizes exactly as it
    would in place. Its end (next to where the answer starts) stays.

    Args:
        length: prompt length in tokens for a given (cut) query.
    """
    lo, hi = 0, len(query)
    while lo < hi:
        mid = (lo + hi) // 2
        if length(query[mid:]) <= max_tokens:
            hi = mid
        else:
            lo = mid + 1
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
    always kept; only if it alone does not fit is the query itself cut.
    """

    tokenizer: Any
    #: the template writes ``Conversation.system`` into the prompt (its own system turn, or in front of the
    #: first query); False: it has no place for one, and ``check`` refuses a conversation that has one
    renders_system: ClassVar[bool] = True

    @abstractmethod
    def prompt(self, conversation: Conversation, max_tokens: int) -> PromptIds:
        """The generation prompt (ending where the answer starts), at most ``max_tokens`` ids."""

    @abstractmethod
    def train_row(
        self, conversation: Conversation, response: str, max_source_length: int, max_target_length: int
    ) -> TrainRow:
        """Prompt and response as one training row; the response (and the end token) are the targets."""

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


class Family(ABC):
    """One model family. Subclasses are registered in :mod:`ptuning.models` by ``architectures`` /
    ``model_type`` of ``config.json``."""

    name: ClassVar[str]
    #: what a user calls it in messages
    label: ClassVar[str]

    @abstractmethod
    def load_model(self, folder: Path, *, dtype, pre_seq_len: int | None, prefix_projection: bool,
                   prefix_dropout: float, device=None) -> nn.Module:
        """The frozen backbone in ``dtype`` with a float32 prefix of ``pre_seq_len`` (None = no prefix).

        Raises:
            CheckpointError: the folder's config or weights cannot be loaded (names the file and key).
        """

    @abstractmethod
    def load_tokenizer(self, folder: Path, vocab_size: int | None = None) -> Any:
        """The tokenizer of the folder (checked against the model's ``vocab_size`` when given).

        Raises:
            ConfigError: no usable tokenizer files.
        """

    @abstractmethod
    def template(self, tokenizer, model_config) -> PromptTemplate:
        """The prompt template of this family."""

    @abstractmethod
    def prefix_shape(self, model_config, pre_seq_len: int, prefix_projection: bool) -> PrefixShape:
        """The prefix that fits ``model_config``."""

    @abstractmethod
    def max_positions(self, model_config) -> int:
        """The longest sequence (prompt + answer) the model's positions cover."""

    def model_config(self, folder: Path):
        """The model's config as :meth:`load_model` builds it, read without the weights (the server sizes its
        generation cache before loading), or None when this family cannot tell it apart from loading."""
        return None

    def fingerprint_keys(self, model_config) -> dict:
        """The config values that decide what the backbone computes (recorded with every checkpoint)."""
        return {}

    def fingerprint(self, model_config) -> str:
        blob = json.dumps({"family": self.name, **self.fingerprint_keys(model_config)}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def text_prefix_input(self, tokenizer, ids: list[int]) -> list[int]:
        """The input that ``model.prefix_init=text`` runs to read the model's keys and values of the text
        ``ids`` (they sit at its first ``len(ids)`` positions). Default: the ids themselves."""
        return list(ids)

    def export_unsupported(self, kind: str) -> str | None:
        """Why ``python -m ptuning.export <kind>`` (``peft``, ``from-peft``, ``original``, ``full``) cannot carry
        this family's prefix, or None when it can."""
        return None

    def block_linear_names(self) -> tuple[str, ...]:
        """Names (last attribute) of the per-layer linears that weight-only quantization replaces."""
        return ()

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
        from ..weights import CheckpointError

        raise CheckpointError(f"{self.label} has no original full-model layout to export to")

    def matmul_weights(self, model_config) -> int:
        """Matmul weights one token passes through (embeddings excluded), for FLOP counts."""
        return 0
