"""ChatGLM-6B's prompt template, shared by training, evaluation, chat and serving.

Rows and conversations become ``prompt [gMASK] <sop>`` (+ ``response <eop>`` for training), as the original
P-Tuning v2 ``main.py`` builds them:

* training: ``prompt[:max_source_length - 1] + [gMASK, <sop>] + response[:max_target_length - 2] + [<eop>]``,
  labels -100 up to ``<sop>``, which is itself a target (predicted at ``[gMASK]``);
* generation: ``prompt[:max_source_length - 2] + [gMASK, <sop>]`` (the original passed the prompt to the
  tokenizer with ``max_length=max_source_length``, which keeps two fewer prompt tokens than training).

A prompt without history is the raw query (as the original ``chat()``); a prompt with history is
``[Round i]\\n问：{query}\\n答：{response}\\n`` per earlier turn and ``[Round n]\\n问：{query}\\n答：``. When a prompt
does not fit, whole oldest turns go first and the current ``[Round n]`` turn is always kept; only if it alone
does not fit is its query cut, keeping its start (``答：`` stays after it), as the original cuts a prompt: its
first tokens stay (the ADGEN recipe's numbers depend on it).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..base import (
    IGNORE_INDEX,
    Conversation,
    PromptIds,
    PromptTemplate,
    TrainRow,
    drop_oldest_turns,
    keep_query_start,
)
from .tokenizer import MAX_BLANK_LENGTH


def build_prompt(query: str, history: Sequence[tuple[str, str]] | None = None) -> str:
    """Render a query and its earlier turns as ChatGLM-6B's chat prompt.

    With earlier turns::

        [Round 0]\\n问：{query 0}\\n答：{response 0}\\n
        ...
        [Round n]\\n问：{query}\\n答：

    Without any (None or empty) the prompt is the raw query, as the original ``chat()`` does. (The
    original P-Tuning v2 training script wrote ``[Round 0]\\n问：{query}\\n答：`` for a row whose history
    column was present but empty; here one rule serves every path.)

    Args:
        query: the current question.
        history: earlier ``(query, response)`` pairs, oldest first.
    """
    if not history:
        return query
    turns = [f"[Round {i}]\n问：{old_query}\n答：{response}\n" for i, (old_query, response) in enumerate(history)]
    return "".join(turns) + f"[Round {len(history)}]\n问：{query}\n答："


class ChatGLMTemplate(PromptTemplate):
    """:class:`~ptuning.models.base.PromptTemplate` of ChatGLM-6B.

    Args:
        tokenizer: a :class:`~ptuning.models.chatglm.tokenizer.ChatGLMTokenizer`.
    """

    #: the original has no system message (``chat()`` takes a query and the history only)
    renders_system = False
    ignores_pad_id_in_answers = True  # the original main.py: a "<pad>" written in an answer is no target

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.gmask_id = tokenizer.gmask_token_id
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        """Pieces of ``text`` without special tokens (``tokenizer.encode`` without its per-call bookkeeping,
        which is most of the preprocessing time)."""
        return self.tokenizer.convert_tokens_to_ids(self.tokenizer.tokenize(text))

    def check(self, conversation: Conversation) -> str | None:
        if conversation.extra or conversation.tools is not None:
            return "ChatGLM-6B has no tools or tool / observation turns (use ChatGLM3-6B, or drop them)"
        if conversation.system is not None:
            return "ChatGLM-6B's template has no system message (use ChatGLM2/3-6B or a chat-template model, or drop it)"
        return None

    def _text_ids(self, conversation: Conversation, max_tokens: int) -> PromptIds:
        """The prompt's text ids (no special tokens), at most ``max_tokens``."""
        problem = self.check(conversation)
        if problem:
            raise ValueError(problem)
        pre, query, history = conversation.source_prefix, conversation.query, list(conversation.history)
        if not history:
            ids = self.encode(pre + query)
            return PromptIds(ids[:max_tokens], 0, max(0, len(ids) - max_tokens))
        ids, dropped = drop_oldest_turns(
            history, max_tokens, lambda kept: self.encode(pre + build_prompt(query, kept) if kept else pre + _last_round(0, query))
        )
        if ids is not None:
            return PromptIds(ids, dropped)
        end = keep_query_start(query, lambda q: len(self.encode(pre + _last_round(0, q))), max_tokens)
        ids = self.encode(pre + _last_round(0, query[:end]))[-max_tokens:] if max_tokens > 0 else []
        return PromptIds(ids, dropped, len(self.encode(query)) - len(self.encode(query[:end])))

    def prompt(self, conversation: Conversation, max_tokens: int) -> PromptIds:
        """``prompt [gMASK] <sop>`` of at most ``max_tokens`` ids (``max_tokens - 2`` text ids)."""
        text = self._text_ids(conversation, max_tokens - 2)
        text.ids = text.ids + [self.gmask_id, self.bos_id]
        return text

    def train_row(
        self, conversation: Conversation, response: str, max_source_length: int, max_target_length: int
    ) -> TrainRow:
        text = self._text_ids(conversation, max_source_length - 1)
        full = self.encode(response)
        answer = full[: max_target_length - 2]
        input_ids = text.ids + [self.gmask_id, self.bos_id] + answer + [self.eos_id]
        context = len(text.ids) + 1  # <sop> is the first target
        labels = [IGNORE_INDEX] * context + input_ids[context:]
        return TrainRow(input_ids, labels, text.dropped_turns, text.truncated_tokens, len(full) - len(answer))

    def render_text(self, conversation: Conversation) -> str:
        return conversation.source_prefix + build_prompt(conversation.query, conversation.history)

    @property
    def stop_token_ids(self) -> list[int]:
        return [self.eos_id]

    @property
    def control_token_ids(self) -> list[int]:
        """The tokenizer's special tokens and GLM's own control pieces (``[gMASK]``, ``[sMASK]``, ``<ENC>`` ...),
        which the tokenizer, as the original, decodes as text."""
        ids = set(super().control_token_ids)
        unk = self.tokenizer.unk_token_id
        for piece in CONTROL_PIECES:
            index = self.tokenizer.convert_tokens_to_ids(piece)
            if index is not None and index != unk:
                ids.add(index)
        return sorted(ids)

    def max_chars_per_token(self) -> int | None:
        """As the base's, with a ``<|blank_N|>`` piece standing for N spaces; None when the tokenizer collapses
        whitespace (``remove_space``)."""
        if getattr(self.tokenizer, "remove_space", False):
            return None
        longest = super().max_chars_per_token()
        return None if longest is None else max(longest, MAX_BLANK_LENGTH)


#: GLM's control pieces of the SentencePiece model (not text)
CONTROL_PIECES = ("[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>")


def _last_round(index: int, query: str) -> str:
    return f"[Round {index}]\n问：{query}\n答："
