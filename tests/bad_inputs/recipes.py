"""Builds the binary members of the bad-input corpus (model folders, checkpoints, pickles) at test time.

They derive from the built-in tiny model and a prefix of it, so the repository carries a few hundred lines
here instead of megabytes of broken copies. Each recipe ``name(dest)`` creates ``dest`` (a folder, or a
file where the name says so) and returns nothing; ``manifest.json`` refers to the result as
``{built}/<name>``. Recipes whose input would run code when unpickled make it create the folder named by
``PAYLOAD_MARKER`` beside the built inputs: the test asserts that folder never appears.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ptuning.build import load_model
from ptuning.checkpoint import META_FILE, PREFIX_FILE, STATE_FILE, prefix_metadata, save_checkpoint
from ptuning.config import BUILTIN_MODEL, ModelConfig
from ptuning.weights import save_weights

PAYLOAD_MARKER = "PAYLOAD_RAN"
EMBEDDING = "transformer.prefix_encoder.embedding.weight"
# the tiny model: 4 layers of width 128, so a prefix row holds 2 x 4 x 128 keys and values
ROW = 2 * 4 * 128


class Payload:
    """Unpickling this calls ``os.mkdir(marker)``: the trace that code ran. A safe loader refuses it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _marker(dest: Path) -> Path:
    return dest.parent / PAYLOAD_MARKER


def _copy_model(dest: Path) -> Path:
    shutil.copytree(BUILTIN_MODEL, dest)
    return dest


def _edit_config(dest: Path, **changes) -> None:
    config = json.loads((dest / "config.json").read_text())
    config.update(changes)
    (dest / "config.json").write_text(json.dumps(config, indent=2))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ---- model folders (model.path=...) ----


def model_no_config(dest: Path) -> None:
    _copy_model(dest)
    (dest / "config.json").unlink()


def model_bad_config_value(dest: Path) -> None:
    # 130 is not a multiple of the 4 attention heads
    _edit_config(_copy_model(dest), hidden_size=130)


def model_config_not_json(dest: Path) -> None:
    _copy_model(dest)
    (dest / "config.json").write_text('{"hidden_size": 128,\n "num_layers": 4\n')


def model_no_weights(dest: Path) -> None:
    _copy_model(dest)
    (dest / "model.safetensors").unlink()


def model_missing_shard(dest: Path) -> None:
    dest.mkdir()
    shutil.copy(BUILTIN_MODEL / "config.json", dest)
    shutil.copy(BUILTIN_MODEL / "ice_text.model", dest)
    shards = save_weights(load_file(str(BUILTIN_MODEL / "model.safetensors")), dest, max_shard_bytes=200_000)
    shards[1].unlink()


def model_truncated_weights(dest: Path) -> None:
    _truncate(_copy_model(dest) / "model.safetensors")


def model_misshaped_key(dest: Path) -> None:
    _copy_model(dest)
    state = load_file(str(dest / "model.safetensors"))
    state["transformer.layers.0.attention.dense.weight"] = torch.zeros(128, 64)
    save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})


def model_small_vocab(dest: Path) -> None:
    # consistent weights for a 996-token vocabulary, but the folder's tokenizer has 998 tokens
    _copy_model(dest)
    state = load_file(str(dest / "model.safetensors"))
    for key in ("transformer.word_embeddings.weight", "lm_head.weight"):
        state[key] = state[key][:996].clone()
    save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})
    _edit_config(dest, vocab_size=996)


def model_no_tokenizer(dest: Path) -> None:
    _copy_model(dest)
    (dest / "ice_text.model").unlink()


def model_malicious_bin(dest: Path) -> None:
    _copy_model(dest)
    (dest / "model.safetensors").unlink()
    torch.save({"transformer.word_embeddings.weight": Payload(_marker(dest))}, dest / "pytorch_model.bin")


# ---- prefix checkpoints (train.init_prefix_from=..., prefix_checkpoint=..., train.resume_from=...) ----


def _prefix_meta(**changes) -> dict:
    meta = {
        "pre_seq_len": 16,
        "prefix_projection": False,
        "num_layers": 4,
        "hidden_size": 128,
        "num_attention_heads": 4,
        "base_model": "builtin:tiny-chatglm",
    }
    meta.update(changes)
    return meta


def _write_prefix(dest: Path, tensors: dict, meta: dict | None) -> None:
    dest.mkdir()
    save_file(tensors, str(dest / PREFIX_FILE), metadata={"format": "pt"})
    if meta is not None:
        (dest / META_FILE).write_text(json.dumps(meta, indent=2))


def ckpt_truncated(dest: Path) -> None:
    _write_prefix(dest, {EMBEDDING: torch.randn(16, ROW)}, _prefix_meta())
    _truncate(dest / PREFIX_FILE)


def ckpt_wrong_keys(dest: Path) -> None:
    _write_prefix(dest, {"encoder.embedding.weight": torch.randn(16, ROW)}, _prefix_meta())


def ckpt_nonfinite(dest: Path) -> None:
    weights = torch.randn(16, ROW)
    weights[3, 7] = float("nan")
    _write_prefix(dest, {EMBEDDING: weights}, _prefix_meta())


def ckpt_misshaped(dest: Path) -> None:
    # the metadata claims what the model has; the tensor has 8 rows, not pre_seq_len=16
    _write_prefix(dest, {EMBEDDING: torch.randn(8, ROW)}, _prefix_meta())


def ckpt_pre_seq_len_8(dest: Path) -> None:
    _write_prefix(dest, {EMBEDDING: torch.randn(8, ROW)}, _prefix_meta(pre_seq_len=8))


def ckpt_projection(dest: Path) -> None:
    tensors = {
        EMBEDDING: torch.randn(16, 128),
        "transformer.prefix_encoder.trans.0.weight": torch.randn(128, 128),
        "transformer.prefix_encoder.trans.0.bias": torch.randn(128),
        "transformer.prefix_encoder.trans.2.weight": torch.randn(ROW, 128),
        "transformer.prefix_encoder.trans.2.bias": torch.randn(ROW),
    }
    _write_prefix(dest, tensors, _prefix_meta(prefix_projection=True))


def ckpt_layers_28(dest: Path) -> None:
    _write_prefix(dest, {EMBEDDING: torch.randn(16, 2 * 28 * 128)}, _prefix_meta(num_layers=28))


def ckpt_width_256(dest: Path) -> None:
    _write_prefix(dest, {EMBEDDING: torch.randn(16, 2 * 4 * 256)}, _prefix_meta(hidden_size=256))


def ckpt_meta_not_json(dest: Path) -> None:
    _write_prefix(dest, {EMBEDDING: torch.randn(16, ROW)}, None)
    (dest / META_FILE).write_text('{"pre_seq_len": 16, "prefix_projection": fal')


def ckpt_empty(dest: Path) -> None:
    dest.mkdir()


def ckpt_malicious_bin(dest: Path) -> None:
    # the original P-Tuning v2 layout (pytorch_model.bin) with an object that runs code when unpickled
    dest.mkdir()
    torch.save({EMBEDDING: torch.randn(16, ROW), "config": Payload(_marker(dest))}, dest / "pytorch_model.bin")


def _valid_checkpoint(dest: Path) -> Path:
    """A real checkpoint-3 of the built-in model (prefix, metadata, training state) inside ``dest``."""
    model = load_model(ModelConfig())
    meta = prefix_metadata(model.config, "builtin:tiny-chatglm")
    state = {"optimizer": {}, "scheduler": {}, "step": 3, "micro_batch": 3, "rng": [], "world_size": 1}
    return save_checkpoint(dest, 3, model, meta, state)


def state_malicious(dest: Path) -> None:
    checkpoint = _valid_checkpoint(dest)
    with open(checkpoint / STATE_FILE, "wb") as fh:
        pickle.dump({"step": 3, "optimizer": Payload(_marker(dest))}, fh)


def state_truncated(dest: Path) -> None:
    _truncate(_valid_checkpoint(dest) / STATE_FILE)


def state_missing(dest: Path) -> None:
    (_valid_checkpoint(dest) / STATE_FILE).unlink()


def run_with_checkpoint(dest: Path) -> None:
    """A training output folder: a checkpoint and a log, which neither a new run nor evaluation may touch."""
    _valid_checkpoint(dest)
    (dest / "train_log.jsonl").write_text('{"step": 1, "loss": 2.5}\n')


# ---- data files that are not JSON or CSV ----


def data_pickle_json(dest: Path) -> None:
    # a pickle named like a JSON file: it must be read as text (and refused), never unpickled
    dest.write_bytes(pickle.dumps([{"content": "x", "summary": Payload(_marker(dest))}]))


def data_pickle_pkl(dest: Path) -> None:
    dest.write_bytes(pickle.dumps([{"content": "x", "summary": Payload(_marker(dest))}]))


RECIPES = {name: fn for name, fn in dict(globals()).items() if callable(fn) and name.split("_")[0] in
           ("model", "ckpt", "state", "run", "data") and not name.startswith("_")}


def build(names: list[str], root: Path) -> None:
    """Builds each named recipe as ``root/<name>`` (``.json`` / ``.pkl`` data recipes get that suffix)."""
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        RECIPES[name](root / target_name(name))


def target_name(name: str) -> str:
    if name == "data_pickle_json":
        return name + ".json"
    if name == "data_pickle_pkl":
        return name + ".pkl"
    return name
