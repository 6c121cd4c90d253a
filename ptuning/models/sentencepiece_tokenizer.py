"""What the SentencePiece tokenizers of ChatGLM-6B (``ice_text.model``) and ChatGLM2/3 (``tokenizer.model``)
share: their model file, read with a one-line error and written back as it was, the ``tokenizer_config.json``
beside it, and the inputs they give the model (``input_ids``, ``attention_mask``, ``position_ids``, left-padded).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import sentencepiece as spm
from transformers import PreTrainedTokenizer

from ..jsonfile import read_json_object

CONFIG_FILE = "tokenizer_config.json"


class SentencePieceTokenizer(PreTrainedTokenizer):
    """A slow transformers tokenizer on one SentencePiece model file (``vocab_files_names["vocab_file"]``).

    Subclasses call :meth:`_load_sentencepiece` before ``PreTrainedTokenizer.__init__`` (which registers the
    special tokens, so it needs the vocabulary) and save through :meth:`_save_files`.

    Attributes:
        sp: the ``SentencePieceProcessor``.
        vocab_file: the path it was read from.
    """

    vocab_files_names: dict[str, str]
    model_input_names = ["input_ids", "attention_mask", "position_ids"]
    padding_side = "left"

    def _load_sentencepiece(self, vocab_file: str | os.PathLike, what: str) -> None:
        """Reads ``vocab_file`` into :attr:`sp`.

        Raises:
            ValueError: SentencePiece cannot parse it (a corrupt or truncated file): one line naming it and
                ``what`` tokenizer it should be.
        """
        self.vocab_file = str(vocab_file)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=self.vocab_file)
        except (RuntimeError, OSError):
            raise ValueError(
                f"{self.vocab_file}: not a readable SentencePiece model (expected the {what} tokenizer; "
                "a corrupt or truncated file?)"
            ) from None

    @staticmethod
    def _stored_config(folder: Path) -> dict[str, Any]:
        """The folder's ``tokenizer_config.json`` ({} without one).

        Raises:
            ValueError: not a JSON object (one line naming the file).
        """
        path = Path(folder) / CONFIG_FILE
        return read_json_object(path) if path.is_file() else {}

    def _save_files(self, save_directory: str | os.PathLike, config: dict[str, Any]) -> tuple[str, str]:
        """Writes the SentencePiece model and ``config`` as ``tokenizer_config.json`` into ``save_directory``
        (made if needed); returns both paths."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        (vocab_path,) = self.save_vocabulary(str(folder))
        config_path = folder / CONFIG_FILE
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return vocab_path, str(config_path)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        """Writes the SentencePiece model, byte for byte as read, as ``[prefix-]<vocab file name>`` in
        ``save_directory``."""
        file_name = self.vocab_files_names["vocab_file"]
        name = f"{filename_prefix}-{file_name}" if filename_prefix else file_name
        path = Path(save_directory) / name
        path.write_bytes(self.sp.serialized_model_proto())
        return (str(path),)

    def create_token_type_ids_from_sequences(self, token_ids_0: list[int], token_ids_1: list[int] | None = None
                                             ) -> list[int]:
        """Zeros over the whole input (GLM models have no token types)."""
        return [0] * len(self.build_inputs_with_special_tokens(token_ids_0, token_ids_1))


__all__ = ["CONFIG_FILE", "SentencePieceTokenizer"]
