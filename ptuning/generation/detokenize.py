"""Answer text from ids arriving one at a time, for the chat command and the server alike.

The rules (the same as evaluation's :meth:`~ptuning.models.base.PromptTemplate.decode` of a whole answer):

* every piece given out is final: text is held back while it ends in U+FFFD (a character spelled by several
  byte pieces, not all of which have arrived);
* a byte sequence the model left incomplete *inside* the answer (another piece followed) stays U+FFFD, as the
  tokenizer decodes it; one left incomplete at the very *end* (the answer was cut by its token limit) is
  dropped (:func:`~ptuning.models.base.drop_incomplete_end`);
* control tokens (``skip_ids``, e.g. ChatGLM-6B's ``[gMASK]``, which its tokenizer decodes as text) are no
  answer text.
"""

from __future__ import annotations

from ..models.base import drop_incomplete_end


class Detokenizer:
    """Text of ids arriving one at a time, each piece final, in time linear in the answer's length.

    Each new id is decoded together with a few ids before it (from ``prefix_offset``): SentencePiece drops a
    leading space at the start of what it decodes, so a window that starts a few ids back decodes the new text
    as the whole answer would.

    Args:
        tokenizer: ``decode(ids, skip_special_tokens=True)``.
        skip_ids: ids that are never answer text (left out of the answer).
        strip_leading: leave out the whitespace the answer starts with (the chat command's answers, as the
            original ``chat()`` strips them; ChatGLM3's begin with an empty metadata line).

    Attributes:
        ids: the answer's ids so far (``skip_ids`` left out).
        text: the text given out so far.
    """

    def __init__(self, tokenizer, skip_ids: frozenset[int] | set[int] = frozenset(), *, strip_leading: bool = False):
        self.tokenizer = tokenizer
        self.skip_ids = frozenset(skip_ids)
        self.strip_leading = strip_leading
        self.ids: list[int] = []
        self.text = ""
        self.prefix_offset = 0  # the window's start
        self.read_offset = 0  # ids up to here are in the text given out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        """Adds an id; returns the new final text (possibly empty)."""
        if token in self.skip_ids:
            return ""
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        if len(after) <= len(before) or after.endswith("\ufffd") or not after.startswith(before):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._give(after[len(before) :])

    def finish(self) -> str:
        """The rest of the answer once it has ended: what was held back, so that :attr:`text` is the whole answer
        decoded at once (less a character cut off at its very end). When decoding it at once rewrites text
        already given out (rare tokenizer whitespace rules), what was given out stands and nothing is added."""
        whole = drop_incomplete_end(self._decode(self.ids))
        if self.strip_leading:
            whole = whole.lstrip()
        if not whole.startswith(self.text):
            return ""
        rest, self.text = whole[len(self.text) :], whole
        return rest

    def _give(self, piece: str) -> str:
        if self.strip_leading and not self.text:
            piece = piece.lstrip()
        self.text += piece
        return piece
