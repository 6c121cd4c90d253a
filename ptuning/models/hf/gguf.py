"""Single-file GGUF models (llama.cpp's format: config, tokenizer and weights in one ``.gguf`` file) as
transformers decoders.

transformers' own GGUF loader reads the file (through the ``gguf`` package) and de-quantizes every weight
into a dense model of the dtype asked for (``GgufConfig(dequantize=True)``: the same dense model whether or
not a packed-matmul kernel is installed). Once loaded, the model is no longer quantized, so its
quantization record is removed (:meth:`transformers.quantizers.HfQuantizer.remove_quantization_config`, the
method transformers' own ``dequantize()`` ends with): ``save_pretrained`` then writes it as any dense model,
which is what ``python -m ptuning.convert gguf`` does. A GGUF config names no ``architectures``; the
loaded model's config gets its class's name, so a saved folder is an ordinary transformers folder.

Reading a GGUF file's metadata parses its whole tokenizer (seconds for a 49k-token vocabulary): the config is
read once per file and process (:func:`gguf_model_config`).
"""

from __future__ import annotations

import copy
import functools
import struct
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    PretrainedConfig,
    PreTrainedModel,
)

from ...weights import CheckpointError


def _file_key(path: str | Path) -> tuple[str, int, int]:
    path = Path(path).expanduser().resolve()
    stat = path.stat()
    return str(path), stat.st_size, stat.st_mtime_ns


GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file
# what transformers' GGUF reader raises on a file it cannot read: a missing or wrong field (KeyError, ValueError
# ...), and a truncated or corrupt file (struct.error, EOFError: a length or offset past the end of the file)
_READ_ERRORS = (OSError, ValueError, KeyError, IndexError, TypeError, ImportError, struct.error, EOFError,
                OverflowError)
_TRUNCATED = (struct.error, EOFError, OverflowError)


def _unreadable(file: Path, err: BaseException, what: str) -> CheckpointError:
    """One line naming ``file``: "not a GGUF ... (reason)", "truncated or corrupt" where the reader ran past
    the end of the file."""
    if isinstance(err, _TRUNCATED):
        try:
            size = f"{file.stat().st_size} bytes"
        except OSError:
            size = reason(err)
        return CheckpointError(f"{file}: truncated or corrupt: not a readable GGUF file ({size})")
    return CheckpointError(f"{file}: {what} ({reason(err)})")


def _check_magic(file: Path) -> None:
    """A file that does not start with GGUF's magic bytes is refused before transformers parses it."""
    try:
        with open(file, "rb") as fh:
            magic = fh.read(len(GGUF_MAGIC))
    except OSError as err:
        raise CheckpointError(f"{file}: cannot read ({err.strerror or err})") from None
    if magic != GGUF_MAGIC:
        raise CheckpointError(f"{file}: not a GGUF file (it does not start with the bytes {GGUF_MAGIC!r})")


def reason(err: BaseException) -> str:
    """The last non-blank line of ``err``'s message (its type's name when it has none): the one-line reason a
    ``CheckpointError`` gives."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def gguf_model_config(path: str | Path) -> PretrainedConfig:
    """The transformers config object of a ``.gguf`` file (``model_type``, sizes; ``architectures`` None), as
    :func:`load_gguf_causal_lm` builds the model from it (a copy: read once per file and process).

    Raises:
        CheckpointError: the file cannot be read as a GGUF model (names the file and the reason).
    """
    try:
        key = _file_key(path)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err.strerror or err})") from None
    _check_magic(Path(key[0]))
    return copy.deepcopy(_cached_config(*key))


@functools.lru_cache(maxsize=8)
def _cached_config(path: str, size: int, mtime_ns: int) -> PretrainedConfig:
    file = Path(path)
    try:
        return AutoConfig.from_pretrained(str(file.parent), gguf_file=file.name)
    except _READ_ERRORS as err:
        raise _unreadable(file, err, "not a GGUF model transformers can read") from None


def load_gguf_causal_lm(path: str | Path, *, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The dense transformers causal LM of a ``.gguf`` file, de-quantized to ``dtype``, in eval mode, with SDPA
    attention and no quantization record (it saves with ``save_pretrained`` like any dense model).

    Raises:
        CheckpointError: the file is no GGUF model transformers can load (names the file).
    """
    file = Path(path).expanduser()
    config = gguf_model_config(file)  # read once per process (from_pretrained would parse the file's metadata again)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(file.parent), gguf_file=file.name, config=config, quantization_config=GgufConfig(dequantize=True),
            dtype=dtype, trust_remote_code=False, attn_implementation="sdpa",
        )
    except _READ_ERRORS as err:
        raise _unreadable(file, err, "not a GGUF model transformers can load") from None
    packed = [name for name, p in model.named_parameters() if not p.is_floating_point()]
    if packed:
        raise CheckpointError(f"{file}: weights stayed packed after de-quantizing ({', '.join(packed[:3])})")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)  # every weight is a dense tensor now
    if not model.config.architectures:
        model.config.architectures = [type(model).__name__]
    return model.eval()


def load_gguf_tokenizer(path: str | Path):
    """The fast tokenizer (with its chat template) stored in a ``.gguf`` file.

    Raises:
        CheckpointError: the file holds no tokenizer transformers can read.
    """
    file = Path(path).expanduser()
    _check_magic(file)
    try:
        return AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name, trust_remote_code=False)
    except _READ_ERRORS as err:
        raise _unreadable(file, err, "no tokenizer transformers can read in the GGUF file") from None
