"""The ChatGLM2-6B / ChatGLM3-6B tokenizer: SentencePiece ``tokenizer.model`` plus the GLM tokens after it.

Behaves as the original ``tokenization_chatglm.py`` of ``THUDM/chatglm2-6b`` (blob ``105dff58``) and
``THUDM/chatglm3-6b`` (blob ``862e8f9a``), without running either:

* Ids ``0 .. S-1`` are the SentencePiece pieces (S = 64789 in the real model): 0 ``<unk>`` (also the pad),
  1 ``<s>`` (unused), 2 ``</s>`` (eos). Text goes to SentencePiece as it is (dummy prefix ``▁``, so ``"\\n"``
  encodes as ``▁`` + ``<0x0A>``).
* The GLM tokens are not pieces; they follow the vocabulary: S+0 ``[MASK]``, S+1 ``[gMASK]``, S+2
  ``[sMASK]``, S+3 ``sop``, S+4 ``eop``, and for ChatGLM3 S+5 ``<|system|>``, S+6 ``<|user|>``, S+7
  ``<|assistant|>``, S+8 ``<|observation|>``. Written in text they stay text (ChatGLM3's
  ``encode_special_tokens=True`` turns the four role tokens into their ids).
* A model input is ``[gMASK] sop a`` (+ ``b </s>``); padded batches are padded on the LEFT with id 0, with
  ``attention_mask`` 0 on the pads and ``position_ids`` 0 on the pads, then 0, 1, 2 ... from the first
  real token.
* Decoding: pads, ``<s>`` and ``</s>`` have no text; ChatGLM2 writes no text for the GLM tokens either, ChatGLM3
  writes their names unless ``skip_special_tokens``.

Loading reads ``tokenizer.model`` and ``tokenizer_config.json`` (``encode_special_tokens``,
``padding_side``); everything else there (``auto_map``, ``name_or_path`` ...) is ignored.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from transformers import AddedToken, BatchEncoding
from transformers.utils import PaddingStrategy

from ...jsonfile import read_json_object
from ..sentencepiece_tokenizer import CONFIG_FILE, SentencePieceTokenizer
from .config import chatglm_version as detect_chatglm_version
from .config import refuse_glm4_original

VOCAB_FILE = "tokenizer.model"
GLM_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
ROLES = ("system", "user", "assistant", "observation")


class ChatGLM2Tokenizer(SentencePieceTokenizer):
    """ChatGLM2-6B / ChatGLM3-6B tokenizer on ``tokenizer.model``.

    Args:
        vocab_file: the SentencePiece model.
        chatglm_version: 2 (five GLM tokens) or 3 (plus the four role tokens).
        encode_special_tokens: ChatGLM3 only: role tokens written in text become their ids.
        padding_side: ``left`` (the original's only side) or ``right``.
    """

    vocab_files_names = {"vocab_file": VOCAB_FILE}

    def __init__(self, vocab_file: str, chatglm_version: int = 2, encode_special_tokens: bool = False,
                 padding_side: str = "left", clean_up_tokenization_spaces: bool = False, **kwargs: Any) -> None:
        if chatglm_version not in (2, 3):
            raise ValueError(f"chatglm_version must be 2 or 3, got {chatglm_version!r}")
        if encode_special_tokens and chatglm_version != 3:
            raise ValueError("encode_special_tokens is a ChatGLM3 option (its role tokens)")
        self._load_sentencepiece(vocab_file, "ChatGLM2/3")
        self.chatglm_version = chatglm_version
        self.encode_special_tokens = encode_special_tokens
        self.sp_size = self.sp.get_piece_size()
        names = GLM_TOKENS + (ROLE_TOKENS if chatglm_version == 3 else ())
        self.glm_tokens = {name: self.sp_size + i for i, name in enumerate(names)}  # name -> id
        self.glm_names = {i: name for name, i in self.glm_tokens.items()}
        self._roles = re.compile("|".join(re.escape(t) for t in ROLE_TOKENS))
        self._vocab: dict[str, int] | None = None
        kwargs.pop("unk_token", None), kwargs.pop("eos_token", None), kwargs.pop("pad_token", None)
        kwargs.pop("bos_token", None)
        unk, eos = self.sp.id_to_piece(self.sp.unk_id()), self.sp.id_to_piece(self.sp.eos_id())
        kwargs["added_tokens_decoder"] = {
            self.sp.unk_id(): AddedToken(unk, normalized=False, special=True),
            self.sp.eos_id(): AddedToken(eos, normalized=False, special=True),
        }
        super().__init__(
            vocab_file=self.vocab_file,
            chatglm_version=chatglm_version,
            encode_special_tokens=encode_special_tokens,
            padding_side=padding_side,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            unk_token=unk,
            eos_token=eos,
            pad_token=unk,
            **kwargs,
        )

    # ---- loading and saving ----

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, chatglm_version: int | None = None,
                        **overrides: Any) -> ChatGLM2Tokenizer:
        """Loads ``tokenizer.model`` (+ ``tokenizer_config.json``) of a local folder.

        Args:
            chatglm_version: 2 or 3; None = decided from the folder as for the model
                (:func:`ptuning.models.chatglm2.config.chatglm_version`).

        Raises:
            FileNotFoundError: no ``tokenizer.model`` in the folder.
            ValueError: a config value of the wrong type (names the file and key).
        """
        folder = Path(folder)
        refuse_glm4_original(folder)  # its tokenizer.model is tiktoken's, not SentencePiece
        vocab_file = folder / VOCAB_FILE
        if not vocab_file.is_file():
            raise FileNotFoundError(
                f"no {VOCAB_FILE} in {folder}: expected a ChatGLM2/3 tokenizer folder ({VOCAB_FILE} + {CONFIG_FILE})"
            )
        stored = cls._stored_config(folder)
        config_file = folder / CONFIG_FILE
        if chatglm_version is None:
            config_json = folder / "config.json"
            raw = read_json_object(config_json) if config_json.is_file() else {}
            if "chatglm_version" in stored and "chatglm_version" not in raw:
                raw["chatglm_version"] = stored["chatglm_version"]
            chatglm_version = detect_chatglm_version(folder, raw)
        kwargs: dict[str, Any] = {}
        for key, kind in (("encode_special_tokens", bool), ("padding_side", str)):
            if key in stored:
                if not isinstance(stored[key], kind):
                    raise ValueError(f"{config_file}: {key!r} is {stored[key]!r}: expected a {kind.__name__}")
                kwargs[key] = stored[key]
        if chatglm_version == 2:
            kwargs.pop("encode_special_tokens", None)
        kwargs.update(overrides)
        return cls(vocab_file=str(vocab_file), chatglm_version=chatglm_version, name_or_path=str(folder), **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, **_: Any) -> tuple[str, ...]:
        """Writes ``tokenizer.model`` and a ``tokenizer_config.json`` that records ``chatglm_version``.

        Returns:
            The paths written.
        """
        config = {
            "tokenizer_class": "ChatGLMTokenizer",
            "chatglm_version": self.chatglm_version,
            "padding_side": self.padding_side,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
            "remove_space": False,
            "do_lower_case": False,
            "clean_up_tokenization_spaces": False,
        }
        if self.chatglm_version == 3:
            config["encode_special_tokens"] = self.encode_special_tokens
        return self._save_files(save_directory, config)

    # ---- vocabulary ----

    @property
    def vocab_size(self) -> int:
        """SentencePiece pieces + the GLM tokens (S + 5, or S + 9 for ChatGLM3)."""
        return self.sp_size + len(self.glm_tokens)

    def __len__(self) -> int:
        return self.vocab_size

    def get_command(self, token: str) -> int:
        """The id of a GLM token (``[gMASK]``, ``sop``, ``<|user|>`` ...), or of ``<eos>`` / ``<pad>``
        (the original's names for 2 and 0).

        Raises:
            KeyError: not a token of this tokenizer.
        """
        fixed = {"<bos>": self.sp.bos_id(), "<eos>": self.sp.eos_id(), "<pad>": self.sp.unk_id()}
        if token in fixed:
            return fixed[token]
        if token not in self.glm_tokens:
            raise KeyError(f"{token!r} is not a special token of the ChatGLM{self.chatglm_version} tokenizer")
        return self.glm_tokens[token]

    @property
    def gmask_token_id(self) -> int:
        return self.glm_tokens["[gMASK]"]

    @property
    def sop_token_id(self) -> int:
        return self.glm_tokens["sop"]

    def get_vocab(self) -> dict[str, int]:
        if self._vocab is None:
            self._vocab = {self.sp.id_to_piece(i): i for i in range(self.sp_size)} | dict(self.glm_tokens)
        return dict(self._vocab)

    def _convert_token_to_id(self, token: str) -> int:
        if token in self.glm_tokens:
            return self.glm_tokens[token]
        return self.sp.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        if index in self.glm_names:
            return self.glm_names[index]
        if 0 <= index < self.sp_size:
            return self.sp.id_to_piece(index)
        return ""  # embedding rows beyond the tokenizer (the padded vocabulary)

    # ---- text <-> ids ----

    def sp_encode(self, text: str) -> list[int]:
        """SentencePiece ids of ``text`` (the original ``SPTokenizer.encode``: dummy prefix, no GLM tokens)."""
        return self.sp.encode(text)

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        if not self.encode_special_tokens:
            return self.sp.encode(text, out_type=str)
        pieces, last = [], 0
        for match in self._roles.finditer(text):
            if match.start() > last:
                pieces += self.sp.encode(text[last:match.start()], out_type=str)
            pieces.append(match.group())
            last = match.end()
        if last < len(text):
            pieces += self.sp.encode(text[last:], out_type=str)
        return pieces

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.sp.decode_pieces(tokens)

    def _decode(self, token_ids: int | list[int], skip_special_tokens: bool = False, **kwargs: Any) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        silent = {self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()}
        pieces = []
        for i in (int(t) for t in token_ids):
            if i in silent or i < 0 or i >= self.vocab_size:
                continue
            if i in self.glm_names:
                if self.chatglm_version == 3 and not skip_special_tokens:
                    pieces.append(self.glm_names[i])
                continue
            pieces.append(self.sp.id_to_piece(i))
        return self.sp.decode_pieces(pieces)

    # ---- model inputs ----

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None
                                         ) -> list[int]:
        """``[gMASK] sop a``, and with a second sequence ``+ b </s>``."""
        ids = [self.gmask_token_id, self.sop_token_id] + list(token_ids_0)
        if token_ids_1 is not None:
            ids += list(token_ids_1) + [self.eos_token_id]
        return ids

    def get_special_tokens_mask(self, token_ids_0: list[int], token_ids_1: list[int] | None = None,
                                already_has_special_tokens: bool = False) -> list[int]:
        if already_has_special_tokens:
            return [1 if i in self.glm_names else 0 for i in token_ids_0 + (token_ids_1 or [])]
        mask = [1, 1] + [0] * len(token_ids_0)
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + [1]
        return mask

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return 3 if pair else 2

    def build_prompt(self, query: str, history: list[tuple[str, str]] | None = None) -> str:
        """ChatGLM2's chat prompt: ``[Round n]\\n\\n问：{query}\\n\\n答：{response}\\n\\n`` per earlier turn (n from 1),
        then ``[Round N]\\n\\n问：{query}\\n\\n答：``."""
        turns = [f"[Round {i}]\n\n问：{q}\n\n答：{r}\n\n" for i, (q, r) in enumerate(history or [], start=1)]
        return "".join(turns) + f"[Round {len(history or []) + 1}]\n\n问：{query}\n\n答："

    def build_single_message(self, role: str, metadata: str, message: str) -> list[int]:
        """ChatGLM3: ``<|role|>`` + ids of ``metadata + "\\n"`` + ids of ``message``.

        Raises:
            ValueError: not ChatGLM3, or an unknown role.
        """
        if self.chatglm_version != 3:
            raise ValueError("role messages are ChatGLM3's format; ChatGLM2 uses build_prompt")
        if role not in ROLES:
            raise ValueError(f"role {role!r}: expected one of {', '.join(ROLES)}")
        return [self.glm_tokens[f"<|{role}|>"]] + self.sp_encode(f"{metadata}\n") + self.sp_encode(message)

    def build_chat_input(self, query: str, history: list[dict] | None = None, role: str = "user") -> BatchEncoding:
        """ChatGLM3's chat input: ``[gMASK] sop`` + each history message (``{"role", "content"[, "metadata"]
        [, "tools"]}``) + the query as ``role`` + ``<|assistant|>``; a batch of one with mask and positions."""
        ids: list[int] = []
        for item in history or []:
            content = item["content"]
            if item["role"] == "system" and "tools" in item:
                content = content + "\n" + json.dumps(item["tools"], indent=4, ensure_ascii=False)
            ids += self.build_single_message(item["role"], item.get("metadata", ""), content)
        ids += self.build_single_message(role, "", query) + [self.glm_tokens["<|assistant|>"]]
        ids = self.build_inputs_with_special_tokens(ids)
        return BatchEncoding(
            {
                "input_ids": torch.tensor([ids]),
                "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
                "position_ids": torch.arange(len(ids))[None],
            }
        )

    def _pad(self, encoded_inputs: dict[str, Any], max_length: int | None = None,
             padding_strategy: PaddingStrategy = PaddingStrategy.DO_NOT_PAD, pad_to_multiple_of: int | None = None,
             padding_side: str | None = None, return_attention_mask: bool | None = None) -> dict[str, Any]:
        """Pads one row with id 0 and adds ``attention_mask`` (0 on pads) and ``position_ids`` (0 on pads,
        then 0, 1, 2 ... over the row's own tokens), as the original."""
        ids = list(encoded_inputs[self.model_input_names[0]])
        length = len(ids)
        if padding_strategy == PaddingStrategy.LONGEST:
            max_length = length
        if max_length is not None and pad_to_multiple_of and max_length % pad_to_multiple_of:
            max_length = (max_length // pad_to_multiple_of + 1) * pad_to_multiple_of
        mask = list(encoded_inputs.get("attention_mask", [1] * length))
        positions = list(encoded_inputs.get("position_ids", range(length)))
        short = 0 if padding_strategy == PaddingStrategy.DO_NOT_PAD or max_length is None else max_length - length
        if short > 0:
            side = padding_side or self.padding_side
            if side == "left":
                ids, mask, positions = [self.pad_token_id] * short + ids, [0] * short + mask, [0] * short + positions
            elif side == "right":
                ids, mask, positions = ids + [self.pad_token_id] * short, mask + [0] * short, positions + [0] * short
            else:
                raise ValueError(f"padding_side {side!r}: expected left or right")
        encoded_inputs[self.model_input_names[0]] = ids
        if return_attention_mask is not False:
            encoded_inputs["attention_mask"] = mask
        encoded_inputs["position_ids"] = positions
        return encoded_inputs


__all__ = ["GLM_TOKENS", "ROLES", "ROLE_TOKENS", "ChatGLM2Tokenizer"]
