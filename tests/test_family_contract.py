"""The family contract, run over every family and its built-in tiny model: the same checks for each row.

Each row of :data:`ROWS` is a model folder and the family that must take it: the bundled ``data/tiny-*``
models and tiny Llama / Qwen2 / Qwen3 decoders written here (random weights, ``data/tiny-glm4``'s tokenizer
and chat template). Adding a family means adding a row (docs/adding-a-family.md).

The checks: the table picks the family and the loaded model keeps :class:`~ptuning.models.base.PrefixTunedModel`;
the prefix shape fits the loaded encoder, the cache and the model's own prefix; the template makes training rows
and prompts that agree; a train step's fused loss and prefix gradient equal the plain float32 computation's,
with and without gradient checkpointing, and only the prefix trains; packed rows give their unpacked loss and
prefix gradient; the decode loop gives ``generate()``'s
ids; a saved prefix loads back to the same logits; every export hook answers, and the exports a family offers
round-trip; the FLOP and memory hooks agree with the loaded model.
"""

from __future__ import annotations

import inspect
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from ptuning import memory
from ptuning.checkpoint import (
    ORIGINAL_FILE,
    export_original,
    load_prefix,
    local_prefix_keys,
    prefix_metadata,
    read_prefix,
    save_checkpoint,
)
from ptuning.data.collate import TrainingCollator
from ptuning.data.packing import PackedRows
from ptuning.evaluation.generate import GenerationSettings, generate_ids, left_pad, strip_generated
from ptuning.interop import export_peft, load_peft_prefix
from ptuning.models import Conversation, Family, family_for
from ptuning.models.base import PrefixTunedModel
from ptuning.prefix import mark_only_prefix_trainable, prefix_module_name, prefix_state_dict
from ptuning.quantization import weight_bytes as measured_weight_bytes
from ptuning.weights import CheckpointError

from .common import ROOT

P = 4
GLM4 = ROOT / "data" / "tiny-glm4"
# transformers' decoders written here: sizes of a tiny model, the vocabulary of tiny-glm4's tokenizer
HF_SIZES = dict(vocab_size=1510, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, pad_token_id=1500, eos_token_id=[1500, 1507, 1509],
                tie_word_embeddings=False)
HF_EXTRA = {"llama": {}, "qwen2": {}, "qwen3": dict(head_dim=16)}  # Qwen3: head_dim is not hidden / heads


@dataclass(frozen=True)
class Row:
    """One family and a tiny model of it: ``folder`` is a built-in model (``data/<name>``) or, for
    ``model_type``, a decoder of that type written by :func:`tiny_decoder`."""

    name: str
    family: str
    folder: Path | None = None
    model_type: str | None = None


ROWS = [
    Row("tiny-chatglm", "chatglm", ROOT / "data" / "tiny-chatglm"),
    Row("tiny-chatglm2", "chatglm2", ROOT / "data" / "tiny-chatglm2"),
    Row("tiny-chatglm3", "chatglm2", ROOT / "data" / "tiny-chatglm3"),
    Row("tiny-glm4", "hf", GLM4),
    Row("tiny-llama", "hf", model_type="llama"),
    Row("tiny-qwen2", "hf", model_type="qwen2"),
    Row("tiny-qwen3", "hf", model_type="qwen3"),
]


def tiny_decoder(model_type: str, folder: Path) -> Path:
    """A random transformers decoder of ``model_type`` saved in ``folder`` with tiny-glm4's tokenizer files."""
    config = AutoConfig.for_model(model_type, **HF_SIZES, **HF_EXTRA[model_type])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy2(GLM4 / name, folder / name)
    return folder


@dataclass
class Case:
    row: Row
    folder: Path
    family: Family
    model: nn.Module
    template: object


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_module):
    """In-process model runs of this module use one intra-op thread (see ``one_thread_module``)."""


@pytest.fixture(scope="module", params=ROWS, ids=[row.name for row in ROWS])
def case(request, tmp_path_factory) -> Case:
    row = request.param
    folder = row.folder or tiny_decoder(row.model_type, tmp_path_factory.mktemp(row.name))
    family = family_for(folder)
    model = load(family, folder)
    tokenizer = family.load_tokenizer(folder, model.config.vocab_size)
    return Case(row, folder, family, model, family.template(tokenizer, model.config))


def load(family: Family, folder: Path, pre_seq_len: int | None = P, projection: bool = False) -> nn.Module:
    torch.manual_seed(1)
    model = family.load_model(folder, dtype=torch.float32, pre_seq_len=pre_seq_len, prefix_projection=projection,
                              prefix_dropout=0.0)
    model.ptuning_family = family  # as ptuning.build.load_model records it
    return model.eval()


CONVERSATIONS = [
    (Conversation("What is a prefix?"), "Keys and values in front."),
    (Conversation("Name two colours", history=[("Hello", "Hi there")]), "Red and blue"),
]


def training_batch(template) -> tuple[torch.Tensor, torch.Tensor]:
    """The template's training rows of :data:`CONVERSATIONS`, right-padded (pads carry -100), as the collator
    makes them."""
    rows = [template.train_row(c, answer, 64, 64) for c, answer in CONVERSATIONS]
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), template.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r.input_ids)] = torch.tensor(r.input_ids)
        labels[i, : len(r.labels)] = torch.tensor(r.labels)
    return ids, labels


def prefix_grad(model, ids, labels, *, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and prefix-embedding gradient of one summed-loss step: the training loop's call (``fused``: logits
    only at targets, the fused loss) or the plain one (every logit, ``F.cross_entropy`` on float32)."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels, loss_reduction="sum", return_logits=not fused, use_cache=False)
    # every family's training loss is the one fused loss of ptuning.models.loss
    assert (type(out.loss.grad_fn).__name__ == "FusedCrossEntropyBackward") == fused
    out.loss.backward()
    encoder = model.get_submodule(prefix_module_name(model))
    return out.loss.detach(), encoder.embedding.weight.grad.clone()


def logits_of(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


# ---------------------------------------------------------------- load and the contract's hooks


def test_the_table_picks_the_family_and_the_model_keeps_the_contract(case):
    assert case.family.name == case.row.family and isinstance(case.family, Family)
    assert isinstance(case.model, PrefixTunedModel)
    named = inspect.signature(case.model.forward).parameters
    wanted = inspect.signature(PrefixTunedModel.forward).parameters
    assert set(wanted) - {"self"} <= set(named)
    # the config without the weights is the loaded model's, as far as what the backbone computes goes
    config = case.family.model_config(case.folder)
    assert case.family.fingerprint(config) == case.family.fingerprint(case.model.config)
    assert case.family.describe(case.model.config).startswith(case.family.label)
    assert 0 < case.family.max_positions(case.model.config) <= 1 << 20


@pytest.mark.parametrize("projection", [False, True])
def test_the_prefix_shape_fits_the_encoder_the_cache_and_the_models_own_prefix(case, projection):
    model = load(case.family, case.folder, P, projection) if projection else case.model
    shape = case.family.prefix_shape(model.config, P, projection)
    assert model.get_submodule(prefix_module_name(model)).shape == shape
    assert model.cache_shape() == (shape.num_key_value_heads, shape.head_dim, shape.num_layers)
    own = model.prefix_key_values(3, torch.float32)
    assert len(own.keys) == len(own.values) == shape.num_layers
    assert all(k.shape == (3, shape.num_key_value_heads, P, shape.head_dim) for k in own.keys + own.values)
    bare = load(case.family, case.folder, None)
    assert bare.prefix_key_values(1, torch.float32) is None
    with pytest.raises(ValueError):
        prefix_module_name(bare)


def test_the_template_makes_rows_and_prompts_that_agree(case):
    template = case.template
    assert template.stop_token_ids
    for conversation, answer in CONVERSATIONS:
        row = template.train_row(conversation, answer, 64, 64)
        prompt = template.prompt(conversation, 64).ids
        assert len(row.input_ids) == len(row.labels)
        assert row.input_ids[: len(prompt)] == prompt  # training and generation see the same prompt
        targets = [t for t in row.labels if t != -100]
        assert targets and targets[-1] in template.stop_token_ids  # the end token is a target
        # the answer is the last target text (a template may also train on earlier answers: ChatGLM3)
        text = template.decode(targets[:-1])
        assert text == answer if not conversation.history else text.endswith(answer)
        assert all(t < case.model.config.vocab_size for t in row.input_ids)


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_a_train_step_has_the_plain_loss_and_gradient_and_trains_only_the_prefix(case, checkpointing):
    model = load(case.family, case.folder)
    mark_only_prefix_trainable(model)
    if checkpointing:
        model.activation_checkpointing_enable()
    model.train()
    ids, labels = training_batch(case.template)
    loss, grad = prefix_grad(model, ids, labels, fused=True)
    plain_loss, plain_grad = prefix_grad(model, ids, labels, fused=False)
    # the reference: F.cross_entropy over every position, outside the model
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float()
    reference = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                ignore_index=-100, reduction="sum")
    assert torch.allclose(loss, reference, rtol=1e-5) and torch.allclose(plain_loss, reference, rtol=1e-5)
    assert grad.abs().sum() > 0 and grad.dtype == torch.float32
    assert torch.allclose(grad, plain_grad, rtol=1e-4, atol=1e-6)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".prefix_encoder." in f".{n}" for n in trained)
    before = prefix_state_dict(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids=ids, labels=labels, loss_reduction="sum", return_logits=False).loss.backward()
    optimizer.step()
    after = prefix_state_dict(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_packed_rows_give_the_loss_and_prefix_gradient_of_the_rows_unpacked(case):
    model = load(case.family, case.folder)
    mark_only_prefix_trainable(model)
    model.train()
    ids, labels = training_batch(case.template)
    loss, grad = prefix_grad(model, ids, labels, fused=True)
    rows = [{"input_ids": r.input_ids, "labels": r.labels}
            for r in (case.template.train_row(c, answer, 64, 64) for c, answer in CONVERSATIONS)]
    lengths = [len(r["input_ids"]) for r in rows]
    packed = PackedRows(rows, lengths, pack_length=sum(lengths) + 3)
    assert len(packed) == 1  # both rows in one sequence, then 3 tokens of padding
    batch = TrainingCollator(pad_token_id=case.template.pad_token_id, pack_length=packed.pack_length)([packed[0]])
    model.zero_grad(set_to_none=True)
    out = model(**batch, loss_reduction="sum", return_logits=False, use_cache=False)
    out.loss.backward()
    encoder = model.get_submodule(prefix_module_name(model))
    assert torch.allclose(out.loss.detach(), loss, rtol=1e-5)
    assert torch.allclose(encoder.embedding.weight.grad, grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- generation


def test_the_decode_loop_gives_the_ids_of_generate(case):
    template, model = case.template, case.model
    prompts = [template.prompt(c, 64).ids for c, _ in CONVERSATIONS]
    stops, pad = list(template.stop_token_ids), template.pad_token_id
    settings = GenerationSettings(max_new_tokens=6)
    ours = generate_ids(model, prompts, settings, pad_id=pad, stop_ids=stops)
    ids, mask = left_pad(prompts, pad)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=stops,
                             pad_token_id=pad)
    theirs = [strip_generated(row[ids.shape[1]:].tolist(), stops, pad) for row in out]
    assert ours == theirs and any(ours)


# ---------------------------------------------------------------- checkpoints and export


def test_a_saved_prefix_loads_back_to_the_same_logits(case, tmp_path):
    meta = prefix_metadata(case.model, f"builtin:{case.row.name}")
    assert meta["family"] == case.family.name
    checkpoint = save_checkpoint(tmp_path, 1, case.model, meta)
    fresh = load(case.family, case.folder)
    torch.manual_seed(5)
    for p in fresh.get_submodule(prefix_module_name(fresh)).parameters():
        nn.init.normal_(p)
    ids, _ = training_batch(case.template)
    assert not torch.equal(logits_of(fresh, ids), logits_of(case.model, ids))
    assert load_prefix(fresh, checkpoint)["family"] == case.family.name
    assert torch.equal(logits_of(fresh, ids), logits_of(case.model, ids))


def test_every_export_hook_answers_and_what_a_family_offers_round_trips(case, tmp_path):
    family, model = case.family, case.model
    for kind in ("peft", "from-peft", "original", "full"):
        why = family.export_unsupported(kind)
        assert why is None or (isinstance(why, str) and why and "\n" not in why)
    ids, _ = training_batch(case.template)
    checkpoint = save_checkpoint(tmp_path / "run", 1, model, prefix_metadata(model, "x"))
    key = family.original_prefix_key("embedding.weight")
    if key is not None and family.export_unsupported("original") is None:
        written = torch.load(export_original(checkpoint, tmp_path / "original"), weights_only=True)
        assert (tmp_path / "original" / ORIGINAL_FILE).is_file()
        assert torch.equal(written[key], local_prefix_keys(read_prefix(checkpoint)[0])["embedding.weight"])
    if family.export_unsupported("full") is None:
        family.export_full(model, tmp_path / "full", dtype=torch.float32, max_shard_bytes=1 << 30,
                           companions_from=case.folder)
        again = load(family, tmp_path / "full")
        assert torch.equal(logits_of(again, ids), logits_of(model, ids))
    else:
        with pytest.raises(CheckpointError):
            family.export_full(model, tmp_path / "full", dtype=torch.float32, max_shard_bytes=1 << 30)
    if family.export_unsupported("peft") is None and family.export_unsupported("from-peft") is None:
        export_peft(model, tmp_path / "adapter")
        fresh = load(family, case.folder)
        load_peft_prefix(fresh, tmp_path / "adapter")
        assert torch.allclose(logits_of(fresh, ids), logits_of(model, ids), atol=1e-6)


def test_the_flop_quantization_and_memory_hooks_agree_with_the_loaded_model(case):
    family, model = case.family, case.model
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".prefix_encoder." not in f".{n}."}
    assert family.matmul_weights(model.config) == sum(m.weight.numel() for m in linears.values())
    names = set(family.block_linear_names())
    quantized = [n for n in linears if n.rsplit(".", 1)[-1] in names]
    layers = family.prefix_shape(model.config, 0, False).num_layers
    assert quantized and len(quantized) % layers == 0  # the same linears in every layer
    formulas = family.train_memory()
    if formulas is not None:
        shape = memory.ModelShape.from_config(model.config)
        assert shape.architecture == formulas.name
        assert memory.weight_bytes(shape, "fp32") == measured_weight_bytes(model)
        assert memory.config_shape(case.folder).layers == layers


def test_a_family_that_keeps_the_default_export_hooks_refuses_every_export_with_its_reason(tmp_path):
    class Defaults(Family):  # the abstract hooks only; every export hook is the default
        name, label = "defaults", "A family with the default hooks"
        load_model = model_config = load_tokenizer = template = max_positions = prefix_shape = None

    family = Defaults()
    for kind in ("peft", "from-peft", "original", "full"):
        why = family.export_unsupported(kind)
        assert isinstance(why, str) and why and "\n" not in why, kind
    assert "full-model layout" in family.export_unsupported("full")
    assert "shifts the positions" in family.export_unsupported("peft")
    assert family.original_prefix_key("embedding.weight") is None
    with pytest.raises(CheckpointError, match="no original full-model layout"):
        family.export_full(nn.Linear(1, 1), tmp_path / "full", dtype=torch.float32, max_shard_bytes=1 << 30)
