"""The ChatGLM-6B tokenizer: SentencePiece ``ice_text.model`` with ChatGLM's whitespace pieces and specials.

Compatible with the original ``tokenization_chatglm.py`` of ``THUDM/chatglm-6b``:

* Text is rewritten before SentencePiece sees it, and back after decoding: ``\\n`` <-> ``<n>``,
  ``\\t`` <-> ``<|tab|>``, a run of 2 to 80 spaces <-> ``<|blank_N|>``.
* Every SentencePiece id is shifted by ``num_image_tokens`` (0 for the current chatglm-6b, 20000 for
  the oldest); ids below it are the ``<image_N>`` tokens, which have no text.
* The special tokens ``[MASK] [gMASK] [sMASK] <unused_0> <sop> <eop> <ENC> <dBLOCK>`` are pieces of the
  SentencePiece model itself, after the ordinary vocabulary (real ids 130000..130007). ``<sop>`` is bos,
  ``<eop>`` is eos, ``<pad>`` (id 3) is the padding token.
* A model input is ``prompt [gMASK] <sop>`` (+ ``response <eop>``).
* Padded batches are left-padded and carry the original's bool ``attention_mask`` ``[B, 1, S, S]``
  (True = hidden) and ``position_ids`` ``[B, 2, S]``, built by :func:`ptuning.models.chatglm.masks.build_masks`
  on the padded rows with their padding mask.

Loading reads only ``ice_text.model`` and ``tokenizer_config.json`` from a local folder; the ``auto_map``
of the original folder is ignored and no code from it is ever run.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from transformers import AddedToken
from transformers.utils import PaddingStrategy

from ..sentencepiece_tokenizer import CONFIG_FILE, SentencePieceTokenizer
from .masks import build_masks

VOCAB_FILE = "ice_text.model"
MAX_BLANK_LENGTH = 80
# tokenizer_config.json keys this class reads and writes; everything else there (auto_map,
# added_tokens_decoder, name_or_path, ...) is ignored on loading.
CONFIG_KEYS = (
    "num_image_tokens",
    "bos_token",
    "eos_token",
    "mask_token",
    "gmask_token",
    "pad_token",
    "unk_token",
    "do_lower_case",
    "remove_space",
    "padding_side",
    "mask_style",
)
MASK_STYLES = ("glm", "padding")

_SPACE_RUN = re.compile(r" {2,}")
_BLANK_TOKEN = re.compile(r"<\|blank_([2-9]|[1-7][0-9]|80)\|>")
_IMAGE_TOKEN = re.compile(r"<image_(\d+)>")


def _blank_run(match: re.Match[str]) -> str:
    # The original replaces runs of 80 first, then 79, ... 2: a long run becomes blank_80 tokens
    # from the left, the rest one blank token, and a lone leftover space stays a space.
    full, rest = divmod(len(match.group()), MAX_BLANK_LENGTH)
    tail = "" if rest == 0 else " " if rest == 1 else f"<|blank_{rest}|>"
    return f"<|blank_{MAX_BLANK_LENGTH}|>" * full + tail


def encode_whitespace(text: str) -> str:
    """``\\n`` -> ``<n>``, ``\\t`` -> ``<|tab|>``, runs of 2 to 80 spaces -> ``<|blank_N|>``."""
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    return _SPACE_RUN.sub(_blank_run, text)


def decode_whitespace(text: str) -> str:
    """Inverse of :func:`encode_whitespace`."""
    text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
    return _BLANK_TOKEN.sub(lambda m: " " * int(m.group(1)), text)


class ChatGLMTokenizer(SentencePieceTokenizer):
    """ChatGLM-6B tokenizer on a SentencePiece model (``ice_text.model``).

    Args:
        vocab_file: path of the SentencePiece model.
        num_image_tokens: ids reserved before the text vocabulary. The original's default is 20000;
            the current chatglm-6b folder sets 0 in its ``tokenizer_config.json``.
        mask_style: what padded batches return. ``"glm"`` (default, as the original): bool
            ``attention_mask`` ``[B, 1, S, S]`` (True = hidden) and ``position_ids`` ``[B, 2, S]``;
            every row must then hold ``<sop>`` and ``[gMASK]`` or ``[MASK]`` (the default
            ``add_special_tokens=True`` adds them). ``"padding"``: the plain HF padding mask ``[B, S]``
            (1 = real token), which the model also accepts.
        do_lower_case, remove_space: the original's text options (lower-case; collapse whitespace).
        Other arguments: the special tokens and the usual ``PreTrainedTokenizer`` options.
    """

    vocab_files_names = {"vocab_file": VOCAB_FILE}

    def __init__(
        self,
        vocab_file: str,
        num_image_tokens: int = 20000,
        bos_token: str = "<sop>",
        eos_token: str = "<eop>",
        mask_token: str = "[MASK]",
        gmask_token: str = "[gMASK]",
        pad_token: str = "<pad>",
        unk_token: str = "<unk>",
        do_lower_case: bool = False,
        remove_space: bool = False,
        mask_style: str = "glm",
        **kwargs: Any,
    ) -> None:
        if mask_style not in MASK_STYLES:
            raise ValueError(f"mask_style must be one of {MASK_STYLES}, got {mask_style!r}")
        if num_image_tokens < 0:
            raise ValueError(f"num_image_tokens must be >= 0, got {num_image_tokens}")
        self._load_sentencepiece(vocab_file, "ChatGLM-6B")
        for name, token in (
            ("bos_token", bos_token),
            ("eos_token", eos_token),
            ("mask_token", mask_token),
            ("gmask_token", gmask_token),
            ("pad_token", pad_token),
        ):
            if self.sp.piece_to_id(token) == self.sp.unk_id():
                raise ValueError(f"{name} {token!r} is not a piece of {self.vocab_file}")
        self.num_image_tokens = num_image_tokens
        self.do_lower_case = do_lower_case
        self.remove_space = remove_space
        self.mask_style = mask_style
        self.gmask_token = gmask_token
        self._text_vocab: dict[str, int] | None = None
        # As the original under transformers 4.x: the text is split around the five HF named specials
        # only, eating the spaces on both sides of each; [gMASK] and the other GLM specials are left to
        # SentencePiece, which matches them as user-defined pieces without splitting the text.
        named = {
            "bos_token": bos_token,
            "eos_token": eos_token,
            "mask_token": mask_token,
            "pad_token": pad_token,
            "unk_token": unk_token,
        }
        kwargs["added_tokens_decoder"] = {
            self._convert_token_to_id(token): AddedToken(
                token, lstrip=True, rstrip=True, normalized=False, special=True
            )
            for token in named.values()
        }
        super().__init__(
            vocab_file=self.vocab_file,
            num_image_tokens=num_image_tokens,
            **named,
            do_lower_case=do_lower_case,
            remove_space=remove_space,
            mask_style=mask_style,
            **kwargs,
        )

    # ---- loading and saving ----

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, **overrides: Any) -> ChatGLMTokenizer:
        """Load from a local folder holding ``ice_text.model`` and (optionally) ``tokenizer_config.json``.

        Args:
            folder: e.g. a ``chatglm-6b`` checkout or a folder written by :meth:`save_pretrained`.
            overrides: constructor arguments that take precedence over the config file.

        Raises:
            FileNotFoundError: ``folder`` or its ``ice_text.model`` does not exist.
        """
        folder = Path(folder)
        vocab_file = folder / VOCAB_FILE
        if not vocab_file.is_file():
            raise FileNotFoundError(
                f"no {VOCAB_FILE} in {folder}: expected a ChatGLM-6B tokenizer folder "
                f"({VOCAB_FILE} + {CONFIG_FILE})"
            )
        config: dict[str, Any] = {}
        stored = cls._stored_config(folder)
        for key in CONFIG_KEYS:
            if key in stored:
                value = stored[key]
                # older files store tokens as serialized AddedToken objects
                config[key] = value["content"] if isinstance(value, dict) else value
        config.update(overrides)
        return cls(vocab_file=str(vocab_file), name_or_path=str(folder), **config)

    def save_pretrained(self, save_directory: str | os.PathLike, **_: Any) -> tuple[str, ...]:
        """Write ``ice_text.model`` and ``tokenizer_config.json`` so that :meth:`from_pretrained` reads them.

        Returns:
            The paths written.
        """
        config = {"tokenizer_class": type(self).__name__}
        for key in CONFIG_KEYS:
            config[key] = getattr(self, key)
        return self._save_files(save_directory, config)

    # ---- vocabulary ----

    @property
    def vocab_size(self) -> int:
        """Image tokens + SentencePiece pieces (the specials are pieces)."""
        return self.num_image_tokens + self.sp.get_piece_size()

    @property
    def gmask_token_id(self) -> int:
        """Id of ``[gMASK]``, the mask token that ends every ChatGLM prompt."""
        return self._convert_token_to_id(self.gmask_token)

    def get_vocab(self) -> dict[str, int]:
        if self._text_vocab is None:
            self._text_vocab = {self._convert_id_to_token(i): i for i in range(self.vocab_size)}
        return {**self._text_vocab, **self._added_tokens_encoder}

    def _convert_token_to_id(self, token: str) -> int:
        if self.num_image_tokens and token.startswith("<image_"):
            image = _IMAGE_TOKEN.fullmatch(token)
            if image is not None and int(image.group(1)) < self.num_image_tokens:
                return int(image.group(1))
        return self.sp.piece_to_id(token) + self.num_image_tokens

    def _convert_id_to_token(self, index: int) -> str:
        if index < self.num_image_tokens:
            return f"<image_{index}>"
        return self.sp.id_to_piece(index - self.num_image_tokens)

    # ---- text <-> pieces ----

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        if self.remove_space:
            text = " ".join(text.strip().split())
        if self.do_lower_case:
            text = text.lower()
        return self.sp.encode(encode_whitespace(text), out_type=str)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return decode_whitespace(self.sp.decode_pieces(tokens))

    def _decode(self, token_ids: int | list[int], **kwargs: Any) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        # pads and image tokens have no text (the original drops both)
        pad_id = self.pad_token_id
        kept = [int(i) for i in token_ids if int(i) != pad_id and int(i) >= self.num_image_tokens]
        if not kept:
            return ""
        return super()._decode(kept, **kwargs)

    # ---- model inputs ----

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        """``a + [gMASK, <sop>]``, and with a second sequence ``+ b + [<eop>]``."""
        ids = token_ids_0 + [self.gmask_token_id, self.bos_token_id]
        if token_ids_1 is not None:
            ids = ids + token_ids_1 + [self.eos_token_id]
        return ids

    def get_special_tokens_mask(
        self,
        token_ids_0: list[int],
        token_ids_1: list[int] | None = None,
        already_has_special_tokens: bool = False,
    ) -> list[int]:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        mask = [0] * len(token_ids_0) + [1, 1]
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + [1]
        return mask

    def _pad(
        self,
        encoded_inputs: dict[str, Any],
        max_length: int | None = None,
        padding_strategy: PaddingStrategy = PaddingStrategy.DO_NOT_PAD,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_attention_mask: bool | None = None,
    ) -> dict[str, Any]:
        """Pad one row; in ``"glm"`` style also build its ``[1, S, S]`` mask and ``[2, S]`` positions.

        As the original, the mask and positions exist only when a target length is known (any padding,
        or ``max_length``); they are always rebuilt from ``input_ids``, whatever came in.
        """
        if self.mask_style == "padding":
            return super()._pad(
                encoded_inputs,
                max_length,
                padding_strategy,
                pad_to_multiple_of,
                padding_side,
                return_attention_mask,
            )
        build = max_length is not None or padding_strategy == PaddingStrategy.LONGEST
        inputs = {k: v for k, v in encoded_inputs.items() if k not in ("attention_mask", "position_ids")}
        padded = super()._pad(
            inputs, max_length, padding_strategy, pad_to_multiple_of, padding_side, return_attention_mask=True
        )
        real = padded.pop("attention_mask")
        if build:
            hidden, positions = self._glm_masks(torch.tensor([padded["input_ids"]]), torch.tensor([real]))
            padded["attention_mask"] = hidden[0].numpy()  # (1, S, S) bool
            padded["position_ids"] = positions[0].numpy()  # (2, S) int64
        return padded

    def _glm_masks(
        self, input_ids: torch.Tensor, padding_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The original tokenizer's mask ``[B, 1, S, S]`` and positions ``[B, 2, S]`` of padded rows."""
        try:
            # The original tokenizer freezes the positions at [MASK] when a row has one and at [gMASK]
            # otherwise, the reverse of the model's preference that build_masks implements: hence the
            # swapped ids.
            return build_masks(
                input_ids,
                bos_token_id=self.bos_token_id,
                mask_token_id=self.gmask_token_id,
                gmask_token_id=self.mask_token_id,
                padding_mask=padding_mask,
            )
        except ValueError as err:
            raise ValueError(
                f"{err}. Padded ChatGLM batches need '[gMASK] <sop>' in every row (add_special_tokens=True); "
                "load the tokenizer with mask_style='padding' to get a plain [B, S] padding mask instead"
            ) from None
