"""How ChatGLM2-6B and ChatGLM3-6B were fine-tuned: their prompts and training rows.

**ChatGLM2** (``ptuning/main.py`` of GitHub ``THUDM/ChatGLM2-6B``, commit ``a33cb4f``): the prompt text is
``tokenizer.build_prompt(query, history)``::

    [Round 1]\\n\\n问：{q1}\\n\\n答：{a1}\\n\\n ... [Round N]\\n\\n问：{query}\\n\\n答：

(also for a row without history, e.g. ADGEN: ``[Round 1]\\n\\n问：{content}\\n\\n答：``), encoded as one text
after ``[gMASK] sop``. Training row: ``a = [gMASK] sop prompt`` (at most ``max_source_length`` ids), ``b =
response`` (at most ``max_target_length``), ``input_ids = a + b + [eos]``, ``labels = [-100] * len(a) + b +
[eos]`` (a response token equal to the pad id 0 becomes -100, as the original's ``ignore_pad_token_for_loss``).
Generation prompt: ``a`` with the same budget; answers end at eos.

**ChatGLM3** (``finetune_demo`` of GitHub ``THUDM/ChatGLM3``): a conversation is ``[gMASK] sop`` and one
message per turn, ``<|role|>`` + ids of ``metadata + "\\n"`` + ids of the content
(``tokenizer.build_single_message``); the prompt ends with ``<|assistant|>``. Order: the system message, the
earlier turns (user, assistant), the current user query, then the tool turns of the current exchange
(``Conversation.extra``: the assistant's tool calls and the ``observation`` messages answering them, or
``finetune_demo``'s ``tool`` entries, expanded the same way), then the answer; ``Conversation.tools`` go into
the system message (``finetune_demo``'s tool prompt). The loss is on assistant messages only — every one of them, earlier turns and tool calls
included, as the original: a token is a target when the token before it belongs to an assistant message,
so each assistant message teaches its text and the token that follows it (the next role token or eos) but
not its own ``<|assistant|>``. ADGEN rows are one user turn and the answer (the ``finetune_demo`` README's
conversion). Answers end at eos, ``<|user|>`` or ``<|observation|>`` (the original ``chat()``).

Both follow the toolkit's one truncation rule: the oldest whole turns go first, the current query's turn is
always kept, and only if it alone does not fit is the query itself cut, keeping its start, as both originals
cut an over-long input (``finetune_demo`` keeps the first ``max_input_length`` ids, then ``<|assistant|>``).
``Conversation.source_prefix`` goes in front of the prompt text (ChatGLM2, as its ``main.py``) or of the
query's text (ChatGLM3).
"""

from __future__ import annotations

import ast
import json
from collections.abc import Sequence
from typing import Any

from ..base import (
    IGNORE_INDEX,
    Conversation,
    PromptIds,
    PromptTemplate,
    TrainRow,
    drop_oldest_turns,
    keep_query_start,
)
from .tokenizer import ChatGLM2Tokenizer

TOOL_CALL_NAME = "tool_call"
TOOL_DEFINITION_PREFIX = "Answer the following questions as best as you can. You have access to the following tools:\n"


class ChatGLM2Template(PromptTemplate):
    """ChatGLM2-6B's ``[Round N]`` prompts (see the module)."""

    def __init__(self, tokenizer: ChatGLM2Tokenizer):
        self.tokenizer = tokenizer
        self.head = [tokenizer.gmask_token_id, tokenizer.sop_token_id]

    def check(self, conversation: Conversation) -> str | None:
        if conversation.extra or conversation.tools is not None:
            return "ChatGLM2-6B has no tools or tool / observation turns (use ChatGLM3-6B, or drop them)"
        return None

    def _query(self, conversation: Conversation) -> tuple[str, list[tuple[str, str]]]:
        problem = self.check(conversation)
        if problem:
            raise ValueError(problem)
        history = [(str(q), str(a)) for q, a in conversation.history]
        query = conversation.query
        if conversation.system:  # no system role: in front of the first query
            if history:
                history[0] = (f"{conversation.system}\n{history[0][0]}", history[0][1])
            else:
                query = f"{conversation.system}\n{query}"
        return query, history

    def _ids(self, prefix: str, query: str, history: list[tuple[str, str]]) -> list[int]:
        return self.head + self.tokenizer.sp_encode(prefix + self.tokenizer.build_prompt(query, history))

    def prompt(self, conversation: Conversation, max_tokens: int) -> PromptIds:
        """``[gMASK] sop`` + ``source_prefix`` + the ``[Round N]`` prompt, at most ``max_tokens`` ids.

        Without history, the first tokens stay (as the original's tokenizer truncation; the ADGEN recipe's
        numbers depend on it). With history, whole oldest turns go first, then the current query keeps its start
        (``答：`` stays after it).

        Raises:
            ValueError: ``max_tokens`` does not hold the current turn's frame with an empty query.
        """
        query, history = self._query(conversation)
        pre = conversation.source_prefix
        if not history:
            ids = self._ids(pre, query, [])
            return PromptIds(ids[:max_tokens], 0, max(0, len(ids) - max_tokens))
        ids, dropped = drop_oldest_turns(history, max_tokens, lambda kept: self._ids(pre, query, list(kept)))
        if ids is not None:
            return PromptIds(ids, dropped)
        end = keep_query_start(query, lambda q: len(self._ids(pre, q, [])), max_tokens)
        ids = self._ids(pre, query[:end], [])
        if len(ids) > max_tokens:
            raise ValueError(f"a prompt budget of {max_tokens} tokens does not hold ChatGLM2's prompt frame")
        return PromptIds(ids, dropped, len(self._ids(pre, query, [])) - len(ids))

    def train_row(self, conversation: Conversation, response: str, max_source_length: int,
                  max_target_length: int) -> TrainRow:
        """``[gMASK] sop prompt response eos``; labels -100 over ``[gMASK] sop prompt``."""
        prompt = self.prompt(conversation, max_source_length)
        full = self.tokenizer.sp_encode(response)
        answer = full[:max_target_length]
        pad = self.tokenizer.pad_token_id
        targets = [IGNORE_INDEX if t == pad else t for t in answer] + [self.tokenizer.eos_token_id]
        return TrainRow(
            input_ids=prompt.ids + answer + [self.tokenizer.eos_token_id],
            labels=[IGNORE_INDEX] * len(prompt.ids) + targets,
            dropped_turns=prompt.dropped_turns,
            truncated_tokens=prompt.truncated_tokens,
            truncated_answer_tokens=len(full) - len(answer),
        )

    def render_text(self, conversation: Conversation) -> str:
        query, history = self._query(conversation)
        return conversation.source_prefix + self.tokenizer.build_prompt(query, history)

    @property
    def stop_token_ids(self) -> list[int]:
        return [self.tokenizer.eos_token_id]


def tool_call_text(parameters: dict[str, Any]) -> str:
    """The code of a tool call as ChatGLM3's ``finetune_demo`` writes it:
    ``\\`\\`\\`python\\ntool_call(name='value', ...)\\n\\`\\`\\```."""
    call = ast.Call(
        func=ast.Name(id=TOOL_CALL_NAME), args=[],
        keywords=[ast.keyword(arg=str(k), value=ast.Constant(v)) for k, v in parameters.items()],
    )
    return f"```python\n{ast.unparse(call)}\n```"


def expand_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """ChatGLM3 messages with ``finetune_demo``'s ``tool`` entries (``name``, ``parameters``, ``observation``)
    expanded into the assistant's call (metadata = the tool name) and the ``observation`` message.

    Raises:
        ValueError: a message that is not a dict with a known role and string content (names the message).
    """
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise ValueError(f"message {i}: expected an object with 'role' and 'content', got {message!r:.80}")
        role = message["role"]
        if role == "tool":
            if not isinstance(message.get("name"), str) or not isinstance(message.get("parameters"), dict):
                raise ValueError(f"message {i}: a 'tool' message needs 'name' (string) and 'parameters' (object)")
            observation = message.get("observation")
            if not isinstance(observation, str):
                observation = json.dumps(observation, ensure_ascii=False)
            out.append({"role": "assistant", "metadata": message["name"], "content": tool_call_text(message["parameters"]),
                        "loss": message.get("loss", True)})
            out.append({"role": "observation", "content": observation})
            continue
        if role not in ("system", "user", "assistant", "observation"):
            raise ValueError(f"message {i}: role {role!r}: expected system, user, assistant, observation or tool")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"message {i} ({role}): 'content' must be a string")
        metadata = message.get("metadata", "") or ""
        if not isinstance(metadata, str):
            raise ValueError(f"message {i} ({role}): 'metadata' must be a string")
        out.append({**message, "metadata": metadata})
    return out


class ChatGLM3Template(PromptTemplate):
    """ChatGLM3-6B's role-token conversations (see the module)."""

    def __init__(self, tokenizer: ChatGLM2Tokenizer):
        if tokenizer.chatglm_version != 3:
            raise ValueError("ChatGLM3Template needs the ChatGLM3 tokenizer (its role tokens)")
        self.tokenizer = tokenizer

    def check(self, conversation: Conversation) -> str | None:
        """The current exchange's tool turns must expand (``tool`` entries with ``name`` and ``parameters``)
        and hold no ``system`` / ``user`` message."""
        try:
            for message in expand_messages(conversation.extra):
                if message["role"] in ("system", "user"):
                    return (f"a {message['role']} message between the last user message and the answer "
                            "(only assistant, tool and observation messages may come there)")
        except ValueError as err:
            return str(err)
        return None

    def _message(self, role: str, content: str, metadata: str = "") -> list[int]:
        return self.tokenizer.build_single_message(role, metadata, content)

    def _parts(self, conversation: Conversation) -> tuple[list[int], list[tuple[list[int], list[bool]]], list[int],
                                                           list[int], list[bool]]:
        """(system ids, per earlier turn (ids, in-assistant flags), user-role head ids, query ids, and the
        tail: extra messages + ``<|assistant|>`` with their flags)."""
        tok = self.tokenizer
        system_text = conversation.system
        if conversation.tools is not None:  # the finetune_demo's tool system prompt, in front of the system text
            definition = TOOL_DEFINITION_PREFIX + json.dumps(conversation.tools, indent=4, ensure_ascii=False)
            system_text = definition if not system_text else f"{definition}\n{system_text}"
        system = self._message("system", system_text) if system_text else []
        turns = []
        for query, answer in conversation.history:
            user, assistant = self._message("user", str(query)), self._message("assistant", str(answer))
            turns.append((user + assistant, [False] * len(user) + [True] * len(assistant)))
        head = [tok.glm_tokens["<|user|>"]] + tok.sp_encode("\n")
        tail: list[int] = []
        flags: list[bool] = []
        for message in expand_messages(conversation.extra):
            if message["role"] in ("system", "user"):
                raise ValueError(f"Conversation.extra holds the current exchange's tool turns; got a {message['role']} message")
            ids = self._message(message["role"], message["content"], message.get("metadata", ""))
            tail += ids
            flags += [message["role"] == "assistant" and bool(message.get("loss", True))] * len(ids)
        tail.append(tok.glm_tokens["<|assistant|>"])
        flags.append(False)
        return system, turns, head, tok.sp_encode(conversation.source_prefix + conversation.query), tail, flags

    def _fit(self, conversation: Conversation, max_tokens: int) -> tuple[list[int], list[bool], int, int]:
        system, turns, head, query, tail, tail_flags = self._parts(conversation)
        start = [self.tokenizer.gmask_token_id, self.tokenizer.sop_token_id]
        fixed = len(start) + len(system) + len(head) + len(tail)
        dropped = 0
        while dropped < len(turns) and fixed + len(query) + sum(len(t[0]) for t in turns[dropped:]) > max_tokens:
            dropped += 1
        room = max_tokens - fixed - sum(len(t[0]) for t in turns[dropped:])
        cut_system = 0
        want = min(len(query), max_tokens // 2)
        if room < want and system:  # a system message (e.g. long tool definitions) that leaves the query less
            # than half the budget loses its end, so that the query keeps up to half
            header = 1 + len(self.tokenizer.sp_encode("\n"))
            cut_system = max(0, min(want - room, len(system) - header))
            system = system[: len(system) - cut_system]
            room += cut_system
        if room < 0:
            raise ValueError(
                f"a prompt budget of {max_tokens} tokens does not hold the current exchange's tool turns "
                f"({fixed - len(system)} tokens with an empty query)"
            )
        truncated = max(0, len(query) - room) + cut_system
        # the query's first tokens stay, as the original's evaluation cut (its first max_input_length ids)
        query = query[:room]
        ids, flags = start + system, [False] * (len(start) + len(system))
        for turn_ids, turn_flags in turns[dropped:]:
            ids, flags = ids + turn_ids, flags + turn_flags
        user = head + query
        ids, flags = ids + user + tail, flags + [False] * len(user) + tail_flags
        return ids, flags, dropped, truncated

    def prompt(self, conversation: Conversation, max_tokens: int) -> PromptIds:
        """``[gMASK] sop`` + messages + ``<|assistant|>``, at most ``max_tokens`` ids.

        A system message that leaves the current query less than half the budget loses its end, so that the
        query keeps up to half (counted in ``truncated_tokens``).

        Raises:
            ValueError: the current exchange's tool turns alone exceed ``max_tokens``.
        """
        ids, _, dropped, truncated = self._fit(conversation, max_tokens)
        return PromptIds(ids, dropped_turns=dropped, truncated_tokens=truncated)

    def train_row(self, conversation: Conversation, response: str, max_source_length: int,
                  max_target_length: int) -> TrainRow:
        """The conversation and its answer (``"\\n"`` + at most ``max_target_length`` answer ids + eos after the
        prompt's ``<|assistant|>``); targets: every token after a token of an assistant message."""
        ids, flags, dropped, truncated = self._fit(conversation, max_source_length)
        full = self.tokenizer.sp_encode(response)
        answer = self.tokenizer.sp_encode("\n") + full[:max_target_length]
        ids = ids + answer + [self.tokenizer.eos_token_id]
        flags = flags[:-1] + [True] + [True] * len(answer)  # the closing <|assistant|> opens the answer
        labels = [IGNORE_INDEX] + [t if f else IGNORE_INDEX for t, f in zip(ids[1:], flags, strict=True)]
        return TrainRow(input_ids=ids, labels=labels, dropped_turns=dropped, truncated_tokens=truncated,
                        truncated_answer_tokens=max(0, len(full) - max_target_length))

    def generation_budget(self, max_source_length: int) -> int:
        """``max_source_length`` + 1: the original evaluation keeps ``max_input_length`` ids and appends
        ``<|assistant|>``."""
        return max_source_length + 1

    @property
    def stop_token_ids(self) -> list[int]:
        tok = self.tokenizer
        return [tok.eos_token_id, tok.glm_tokens["<|user|>"], tok.glm_tokens["<|observation|>"]]


__all__ = [
    "TOOL_CALL_NAME",
    "TOOL_DEFINITION_PREFIX",
    "ChatGLM2Template",
    "ChatGLM3Template",
    "expand_messages",
    "tool_call_text",
]
