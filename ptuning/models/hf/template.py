"""Prompts of transformers-native models: the tokenizer's own chat template, or plain prompt -> response.

* Chat (chat requests, rows of a data set with a history column): the messages ``[system], user, assistant,
  ..., user`` rendered by the tokenizer's chat template (``apply_chat_template``, Jinja, from the model
  folder) with the generation prompt; ``data.source_prefix`` goes in front of the current query. The answer
  in a training row is what the template writes after the generation prompt for an assistant message
  (e.g. Qwen3's empty ``<think></think>`` block, the answer, ``<|im_end|>``), up to and including the first
  stop token; when the template writes none (GLM-4 ends a turn with the next role token), ``eos``.
* Plain (``Conversation.plain``: rows of a data set without a history column, e.g. ADGEN): the tokenizer's
  own leading special tokens (GLM-4's ``[gMASK]<sop>``, Llama's ``<|begin_of_text|>``, none for Qwen), then
  ``source_prefix + query``; the answer is ``response`` + ``eos``.

Truncation, the same rule everywhere: whole oldest turns go first, the current query's turn is always kept;
only if it alone does not fit is the query itself cut, keeping its start (as the original P-Tuning v2 scripts
cut their inputs), in chat re-rendered in its frame so the generation prompt stays. A response is cut to
``max_target_length`` tokens including its end tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..base import (
    IGNORE_INDEX,
    Conversation,
    PromptIds,
    PromptTemplate,
    TrainRow,
    drop_incomplete_end,
    drop_oldest_turns,
    keep_query_start,
)

# a marker that no tokenizer merges with its neighbours and no template rewrites
_MARK = "\u2063\u2062\u2063"


class ChatTemplatePrompt(PromptTemplate):
    """:class:`~ptuning.models.base.PromptTemplate` of transformers-native models.

    Args:
        tokenizer: a transformers fast tokenizer with (for chat) a ``chat_template``.
        stop_token_ids: ids that end an answer (e.g. from ``generation_config.json``); the first token the
            chat template writes after an answer is added when it is a special token.

    Raises:
        ValueError: the tokenizer has neither an ``eos_token`` nor stop ids.
    """

    def __init__(self, tokenizer, stop_token_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        stops = [i for i in stop_token_ids if i is not None]
        if tokenizer.eos_token_id is not None:
            stops.insert(0, tokenizer.eos_token_id)
        if not stops:
            raise ValueError("the tokenizer has no eos_token and the model no eos_token_id: nothing ends an answer")
        self.eos_id = stops[0]
        self.lead = self._leading_special_ids()
        self.answer_head = self.answer_tail = ""
        self._stops = list(dict.fromkeys(stops))
        if tokenizer.chat_template:
            self.answer_head, self.answer_tail = self._answer_frame()
            tail = self.encode(self.answer_tail)
            if tail and tail[0] in set(tokenizer.all_special_ids) | set(self._added_special_ids()):
                self._stops = list(dict.fromkeys([*self._stops, tail[0]]))

    # ---- tokenizer facts

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``, special-token strings in it read as the special tokens, nothing added. Whole texts
        are encoded and then cut by the one truncation rule, so transformers' "Token indices sequence length is
        longer than the specified maximum" warning (``model_max_length``) is off here (``verbose=False``)."""
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] if text else []

    def _added_special_ids(self) -> list[int]:
        return [i for i, token in self.tokenizer.added_tokens_decoder.items() if token.special]

    def _leading_special_ids(self) -> list[int]:
        """What the tokenizer puts in front of a text (e.g. ``[gMASK]<sop>``, ``<|begin_of_text|>``)."""
        bare = self.encode(_MARK)
        marked = self.tokenizer(_MARK, add_special_tokens=True, verbose=False)["input_ids"]
        for start in range(len(marked) - len(bare) + 1):
            if marked[start:start + len(bare)] == bare:
                return marked[:start]
        return []

    def _answer_frame(self) -> tuple[str, str]:
        """The text the chat template writes before and after an answer, after the generation prompt."""
        messages = [{"role": "user", "content": "q"}]
        prompt = self._render(messages, generation_prompt=True)
        full = self._render([*messages, {"role": "assistant", "content": _MARK}], generation_prompt=False)
        if not full.startswith(prompt) or _MARK not in full[len(prompt):]:
            return "", ""
        head, _, tail = full[len(prompt):].partition(_MARK)
        return head, tail

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    @property
    def stop_token_ids(self) -> list[int]:
        return list(self._stops)

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return self.eos_id if pad is None else pad

    # ---- prompts

    def _messages(self, conversation: Conversation, history: Sequence[tuple[str, str]], query: str) -> list[dict]:
        problem = self.check(conversation)  # tools / tool turns: ChatGLM3's format, which no chat template here reads
        if problem:
            raise ValueError(problem)
        messages = [{"role": "system", "content": conversation.system}] if conversation.system else []
        for user, assistant in history:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        return [*messages, *conversation.extra, {"role": "user", "content": conversation.source_prefix + query}]

    def _chat_text(self, conversation: Conversation, history: Sequence[tuple[str, str]], query: str) -> str:
        if not self.tokenizer.chat_template:
            raise ValueError(
                f"{getattr(self.tokenizer, 'name_or_path', 'the tokenizer')}: no chat template (chat_template in "
                "tokenizer_config.json or chat_template.jinja) to render a conversation; plain rows need none"
            )
        return self._render(self._messages(conversation, history, query), generation_prompt=True)

    def _plain_body(self, conversation: Conversation) -> str:
        if conversation.history or conversation.extra:
            raise ValueError("a plain prompt -> response row has no history")
        system = f"{conversation.system}\n" if conversation.system else ""
        return conversation.source_prefix + system + conversation.query

    def prompt(self, conversation: Conversation, max_tokens: int) -> PromptIds:
        """The prompt ids, ending where the answer starts, at most ``max_tokens`` of them."""
        if conversation.plain:
            body = self.encode(self._plain_body(conversation))
            room = max(0, max_tokens - len(self.lead))
            return PromptIds((self.lead + body[:room])[:max_tokens], 0, max(0, len(body) - room))
        history, query = list(conversation.history), conversation.query
        ids, dropped = drop_oldest_turns(
            history, max_tokens, lambda kept: self.encode(self._chat_text(conversation, kept, query))
        )
        if ids is not None:
            return PromptIds(ids, dropped)
        # the current turn alone does not fit: keep the start of the query, re-rendered in its frame
        end = keep_query_start(query, lambda q: len(self.encode(self._chat_text(conversation, [], q))), max_tokens)
        ids = self.encode(self._chat_text(conversation, [], query[:end]))
        ids = ids[-max_tokens:] if max_tokens > 0 else []
        return PromptIds(ids, dropped, len(self.encode(query)) - len(self.encode(query[:end])))

    def render_text(self, conversation: Conversation) -> str:
        if conversation.plain:
            return self.tokenizer.decode(self.lead) + self._plain_body(conversation)
        return self._chat_text(conversation, conversation.history, conversation.query)

    def train_row(
        self, conversation: Conversation, response: str, max_source_length: int, max_target_length: int
    ) -> TrainRow:
        """``prompt + answer``; the answer's tokens (with its end tokens) are the targets."""
        prompt = self.prompt(conversation, max_source_length)
        if conversation.plain:
            head, tail = [], [self.eos_id]
        else:
            head, tail = self.encode(self.answer_head), self._answer_end()
        room = max(0, max_target_length - len(head) - len(tail))
        body = self.encode(response)
        answer = (head + body[:room] + tail)[:max_target_length]
        kept = min(len(body), room)
        return TrainRow(
            prompt.ids + answer, [IGNORE_INDEX] * len(prompt.ids) + answer, prompt.dropped_turns,
            prompt.truncated_tokens, len(body) - kept,
        )

    def _answer_end(self) -> list[int]:
        """The template's text after an answer up to its first stop token, or ``eos`` when it has none."""
        tail = self.encode(self.answer_tail)
        for i, token in enumerate(tail):
            if token in self._stops:
                return tail[:i + 1]
        return [self.eos_id]

    def decode(self, ids: Sequence[int]) -> str:
        """The answer text: special tokens dropped, a character cut off at the end dropped
        (:func:`~ptuning.models.base.drop_incomplete_end`), and what the template writes before an answer (e.g.
        an empty ``<think></think>`` block) taken off its front."""
        text = drop_incomplete_end(self.tokenizer.decode(list(ids), skip_special_tokens=True))
        head = self.tokenizer.decode(self.encode(self.answer_head), skip_special_tokens=True).strip()
        text = text.strip()
        if head and text.startswith(head):
            text = text[len(head):]
        return text.strip()
