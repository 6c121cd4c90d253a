"""Helpers shared by the tests: where the parity sets and assets are."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(__file__).resolve().parent / "assets"
PARITY_DIRS = [ASSETS / "parity", ROOT.parent / "shared" / "parity"]
GLM2_PARITY_DIRS = [ASSETS / "parity-glm2", ROOT.parent / "shared" / "parity-glm2"]


def parity_sets(dirs: list[Path] = PARITY_DIRS) -> list[Path]:
    """Every parity folder (``config.json`` + ``vectors.safetensors``) under ``dirs``, shipped copies first.

    Sets that exist only beside the checkout (``../shared/parity``, ``../shared/parity-glm2``) are included
    too, so new sets of the same format are tested without code changes.
    """
    found: dict[str, Path] = {}
    for base in dirs:
        if base.is_dir():
            for sub in sorted(base.iterdir()):
                if (sub / "vectors.safetensors").is_file() and sub.name not in found:
                    found[sub.name] = sub
    return list(found.values())


def read_cases(folder: Path) -> dict:
    return json.loads((folder / "cases.json").read_text())


def read_wandb_history(run_file: Path) -> list[dict]:
    """The logged rows of a wandb ``.wandb`` run file (a LevelDB-style log of protobuf records), as dicts."""
    from wandb.proto import wandb_internal_pb2

    raw = Path(run_file).read_bytes()
    assert raw[:4] == b":W&B", run_file
    block, pos, chunks, rows = 32768, 7, b"", []
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        data, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):  # full / first
            chunks = data
        elif kind in (3, 4):  # middle / last
            chunks += data
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            if record.WhichOneof("record_type") == "history":
                rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item})
    return rows


@contextmanager
def small_disk(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (``300k``) mounted at ``folder`` for the block: a real disk that fills up. Grow it with
    :func:`resize_disk`. Skips the test, saying why, where this process may not mount (not root, or a container
    without the capability); the same behaviours are also tested with the failing write injected."""
    folder.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("a real full disk needs a small tmpfs, and there is no mount command here")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"a real full disk needs a small tmpfs, which this process may not mount "
                    f"({proc.stderr.strip() or f'mount exited {proc.returncode}'})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def resize_disk(folder: Path, size: str) -> None:
    """Gives the tmpfs at ``folder`` (:func:`small_disk`) the size ``size``: space is freed."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True, capture_output=True)


def saved_activation_bytes(model, input_ids, labels) -> int:
    """Bytes of the tensors autograd saves for backward during one training forward of ``model`` (each
    storage once; the parameters' own storages not counted): what an activation-memory formula predicts."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if type(t) in (torch.Tensor, torch.nn.Parameter) and t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=input_ids, labels=labels)
    return sum(saved.values())


def small_chatml_template(chat_template: str, end_token: str):
    """A ChatML tokenizer trained on a few sentences (byte-level BPE, 300 ids, then ``<|endoftext|>``,
    ``<|im_start|>``, ``<|im_end|>``) with ``end_token`` as its eos and pad token, as the prompt template of the
    transformers family."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ptuning.models.hf.template import ChatTemplatePrompt

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    texts = ["hello world, how are you", "the quick brown fox jumps over the lazy dog"] * 20
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                             show_progress=False))
    tokenizer.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=end_token, pad_token=end_token)
    fast.chat_template = chat_template
    return ChatTemplatePrompt(fast)
