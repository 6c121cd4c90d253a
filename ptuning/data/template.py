"""The one prompt template, shared by training, evaluation and chat."""

from __future__ import annotations

from collections.abc import Sequence


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
    turns = [
        f"[Round {i}]\n问：{old_query}\n答：{response}\n" for i, (old_query, response) in enumerate(history)
    ]
    return "".join(turns) + f"[Round {len(history)}]\n问：{query}\n答："
