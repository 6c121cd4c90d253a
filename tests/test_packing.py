"""Packed training rows: a pack's loss and prefix gradients are those of its rows unpadded and alone, for every
family; packs are deterministic, hide nothing a row needs and show nothing of another row; a packed run
checkpoints and resumes exactly, with and without gradient checkpointing."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from ptuning.build import load
from ptuning.config import ModelConfig
from ptuning.data import DataConfig, PackedRows, TrainingCollator, build_datasets, pack_rows
from ptuning.models.chatglm.masks import build_masks, build_packed_masks
from ptuning.models.packed import PADDING_SEQUENCE, PackedLayout, packed_position_ids
from ptuning.prefix import mark_only_prefix_trainable

from .test_hf_prefix import ARCHITECTURES, COMMON, plain_model, with_prefix
from .test_training import losses, prefix_of, train

BUILTIN = {"ChatGLM-6B": "builtin:tiny-chatglm", "ChatGLM2-6B": "builtin:tiny-chatglm2",
           "ChatGLM3-6B": "builtin:tiny-chatglm3", "GLM-4 (folder)": "builtin:tiny-glm4"}
PACK = 256


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_module):
    """In-process model runs of this module use one intra-op thread (see ``one_thread_module``)."""


def test_every_row_lands_in_exactly_one_pack_that_holds_it_and_the_packs_depend_only_on_lengths_and_seed():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    packs = pack_rows(lengths, 128, seed=3)
    assert sorted(i for pack in packs for i in pack) == list(range(500))
    assert all(sum(lengths[i] for i in pack) <= 128 for pack in packs)
    # best fit keeps the packs full: at most a few percent of the slots are padding here
    assert sum(lengths) / (128 * len(packs)) > 0.95
    assert pack_rows(lengths, 128, seed=3) == packs
    assert pack_rows(lengths, 128, seed=4) != packs


def test_a_row_longer_than_pack_length_is_named():
    with pytest.raises(ValueError, match=r"row 1 has 9 tokens, more than data.pack_length=8: raise data.pack_length"):
        pack_rows([3, 9, 2], 8)


def test_packed_rows_number_each_row_hide_its_first_label_and_pad_to_pack_length():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    packed = PackedRows(rows, [3, 2], pack_length=8)
    assert len(packed) == 1 and packed.fill() == 5 / 8
    (row,) = [packed[0]]
    order = packed.packs[0]
    assert row["input_ids"] == [x for i in order for x in rows[i]["input_ids"]]
    assert row["sequence_ids"] == [n for n, i in enumerate(order) for _ in rows[i]["input_ids"]]
    first = [sum(len(rows[j]["input_ids"]) for j in order[:n]) for n in range(len(order))]
    assert all(row["labels"][at] == -100 for at in first)  # never a target: it would be predicted across rows
    assert [x for at, x in enumerate(row["labels"]) if at not in first] == [
        x for i in order for x in rows[i]["labels"][1:]]
    batch = TrainingCollator(pad_token_id=0, pack_length=8)([row])
    assert batch["input_ids"].shape == (1, 8) and batch["sequence_ids"][0, 5:].tolist() == [PADDING_SEQUENCE] * 3
    assert batch["labels"][0, 5:].tolist() == [-100] * 3
    assert packed_position_ids(batch["sequence_ids"])[0].tolist() == [
        *[p for i in order for p in range(len(rows[i]["input_ids"]))], 0, 1, 2]
    # rows without sequence_ids (evaluation) are padded to their longest as before
    assert TrainingCollator(pad_token_id=0, pack_length=8)(rows)["input_ids"].shape == (2, 3)


def test_the_row_layout_gathers_every_row_alone_and_puts_it_back():
    sequence_ids = torch.tensor([[0, 0, 0, 1, 1, PADDING_SEQUENCE], [0, 0, 0, 0, 1, 2]])
    layout = PackedLayout(sequence_ids)
    assert (layout.rows, layout.width) == (5, 4) and layout.pack.tolist() == [0, 0, 1, 1, 1]
    x = torch.arange(12.0).view(2, 1, 6, 1)  # (B, H, L, D): each token's flat index
    rows = layout.to_rows(x)[:, 0, :, 0]  # (R, W)
    assert rows.masked_fill(~layout.filled, -1).tolist() == [[0, 1, 2, -1], [3, 4, -1, -1], [6, 7, 8, 9],
                                                             [10, -1, -1, -1], [11, -1, -1, -1]]
    back = layout.from_rows(layout.to_rows(x).transpose(1, 2))  # (B, L, H, D)
    assert back[..., 0, 0].tolist() == [[0, 1, 2, 3, 4, 0], [6, 7, 8, 9, 10, 11]]  # the padding's output: 0
    assert layout.ids_rows(torch.arange(12).view(2, 6), fill=-5)[1].tolist() == [3, 4, -5, -5]


def test_chatglm_packed_masks_and_positions_are_each_rows_own():
    config = load(ModelConfig(path="builtin:tiny-chatglm", pre_seq_len=4)).model.config
    ids = {"bos_token_id": config.bos_token_id, "mask_token_id": config.mask_token_id,
           "gmask_token_id": config.gmask_token_id}
    rows = [[20, 21, config.gmask_token_id, config.bos_token_id, 30, 31],
            [22, config.gmask_token_id, config.bos_token_id, 32],
            [23, 24, 25, config.mask_token_id, config.bos_token_id, 33, 34, 35]]
    pack = torch.tensor([[x for r in rows for x in r] + [0, 0]])
    sequence_ids = torch.tensor([[n for n, r in enumerate(rows) for _ in r] + [PADDING_SEQUENCE] * 2])
    hidden, positions = build_packed_masks(pack, sequence_ids, **ids)
    start = 0
    for row in rows:
        alone_hidden, alone_positions = build_masks(torch.tensor([row]), **ids)
        end = start + len(row)
        assert torch.equal(hidden[0, 0, start:end, start:end], alone_hidden[0, 0])
        assert torch.equal(positions[0, :, start:end], alone_positions[0])
        assert bool(hidden[0, 0, start:end, :start].all()) and bool(hidden[0, 0, start:end, end:].all())
        start = end
    # the padding after the last row: causal among itself, positions 0, never seen by a row
    assert torch.equal(hidden[0, 0, start:, start:], torch.tensor([[False, True], [False, False]]))
    assert positions[0, :, start:].eq(0).all() and hidden[0, 0, :start, start:].all()
    without_sop = pack.clone()
    without_sop[0, len(rows[0]) + 2] = 20  # the second row's <sop>
    with pytest.raises(ValueError, match=r"packed row 1 of batch row 0 has no <sop>"):
        build_packed_masks(without_sop, sequence_ids, **ids)


def loss_and_grads(model, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch, loss_reduction="sum", return_logits=False, use_cache=False).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def assert_packed_equals_unpacked(model, rows: list[dict], pad_token_id: int) -> None:
    """The pack's summed loss and prefix gradients equal those of the rows in one padded batch (within 1e-5),
    and the rows simply concatenated (no sequence_ids) give another loss: the separation is what makes them equal."""
    collate = TrainingCollator(pad_token_id=pad_token_id, pack_length=PACK)
    packed = PackedRows(rows, [len(r["input_ids"]) for r in rows], PACK, seed=0)
    assert len(packed) >= 2  # several packs, each with several rows
    unpacked_loss, unpacked_grads = loss_and_grads(model, collate(rows))
    batch = collate([packed[i] for i in range(len(packed))])
    packed_loss, packed_grads = loss_and_grads(model, batch)
    assert abs(packed_loss - unpacked_loss) <= 1e-5 * unpacked_loss.abs()
    for got, want in zip(packed_grads, unpacked_grads, strict=True):
        assert (got - want).abs().max() <= 1e-5 * max(want.abs().max(), 1e-3)
    concatenated = {k: v for k, v in batch.items() if k != "sequence_ids"}
    with torch.no_grad():
        leaked = model(**concatenated, loss_reduction="sum", return_logits=False, use_cache=False).loss
    assert abs(leaked - unpacked_loss) > 1e-3 * unpacked_loss.abs()


def template_rows(template, count=40) -> list[dict]:
    cfg = DataConfig(train_file="data/adgen_sample/train.json", max_train_samples=count)
    return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in build_datasets(cfg, template, "train")]


@pytest.mark.parametrize("name", BUILTIN)
@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "checkpointing"])
def test_packed_loss_and_prefix_gradients_equal_the_unpacked_rows_of_a_bundled_model(name, checkpointing, tmp_path):
    loaded = load(ModelConfig(path=BUILTIN[name], pre_seq_len=4, prefix_dropout=0.0))
    model = loaded.model.train()
    mark_only_prefix_trainable(model)
    if checkpointing:
        model.activation_checkpointing_enable()
    assert_packed_equals_unpacked(model, template_rows(loaded.template), loaded.template.pad_token_id)


def random_rows(count=24, seed=0) -> list[dict]:
    """Rows of 5 to 60 tokens: a prompt (no targets) and an answer (targets)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        length = int(torch.randint(5, 61, (), generator=g))
        prompt = int(torch.randint(1, length - 1, (), generator=g))
        ids = torch.randint(3, 96, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def sharp_model(arch: str):
    """A tiny random decoder whose attention depends on its context enough to show a leak between rows (weights
    drawn with std 0.3 instead of 0.02)."""
    config_cls, model_cls, extra = ARCHITECTURES[arch]
    config = config_cls(**COMMON, **extra, initializer_range=0.3)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return model_cls(config).eval()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_packed_loss_and_prefix_gradients_equal_the_unpacked_rows_of_transformers_decoders(arch):
    model = with_prefix(sharp_model(arch), projection=arch == "Qwen2ForCausalLM").train()
    mark_only_prefix_trainable(model)
    assert_packed_equals_unpacked(model, random_rows(), pad_token_id=0)
    checkpointed = copy.deepcopy(model)
    checkpointed.activation_checkpointing_enable()
    assert_packed_equals_unpacked(checkpointed, random_rows(seed=1), pad_token_id=0)


def test_sequence_ids_refuse_a_padding_mask_and_a_cache():
    model = with_prefix(plain_model("LlamaForCausalLM"))
    ids = torch.randint(3, 96, (1, 6))
    sequence_ids = torch.tensor([[0, 0, 0, 1, 1, 1]])
    with pytest.raises(ValueError, match="sequence_ids \\(packed rows\\) come without an attention_mask"):
        model(ids, attention_mask=torch.ones_like(ids), sequence_ids=sequence_ids)
    with pytest.raises(ValueError, match=r"sequence_ids has shape \(1, 5\); expected the shape of input_ids"):
        model(ids, sequence_ids=sequence_ids[:, :5])


PACKED = ["data.packing=true", f"data.pack_length={PACK}", "train.per_device_batch_size=2", "model.prefix_dropout=0"]


def test_a_packed_run_says_how_full_its_packs_are_and_resumes_exactly(tmp_path, capsys, monkeypatch):
    from ptuning.training import loop as loop_module

    full = train(tmp_path / "full", *PACKED)
    out = capsys.readouterr().out
    assert "64 examples in " in out and f"packed sequences of {PACK} tokens (" in out and "% filled)" in out

    class Interrupted(Exception):
        pass

    real_save = loop_module.save_checkpoint

    def save_then_stop(*args, **kwargs):
        raise Interrupted(real_save(*args, **kwargs))

    monkeypatch.setattr(loop_module, "save_checkpoint", save_then_stop)
    with pytest.raises(Interrupted):
        train(tmp_path / "cut", *PACKED)
    monkeypatch.setattr(loop_module, "save_checkpoint", real_save)
    resumed = train(tmp_path / "cut", *PACKED, "train.resume_from=latest")
    a, b = prefix_of(full.checkpoint), prefix_of(resumed.checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "full") == losses(tmp_path / "cut")


def test_resuming_warns_against_the_settings_of_the_run_that_wrote_the_checkpoint(tmp_path, capsys):
    import shutil

    train(tmp_path, *PACKED)  # checkpoint-3 and checkpoint-6, packed
    shutil.rmtree(tmp_path / "checkpoint-6")
    unpacked = ["train.per_device_batch_size=2", "model.prefix_dropout=0", "train.resume_from=latest"]
    train(tmp_path, *unpacked)  # resumes the packed checkpoint-3 and writes checkpoint-6 unpacked
    assert (f"data.packing (True -> False), data.pack_length ({PACK} -> 1024) changed from the run that wrote it "
            f"({tmp_path / 'checkpoint-3' / 'prefix_config.json'})") in capsys.readouterr().err
    train(tmp_path, *unpacked, "train.max_steps=9")  # resumes checkpoint-6, written with these settings
    assert "changed from the run that wrote it" not in capsys.readouterr().err


def test_a_packed_run_with_gradient_checkpointing_gives_the_same_prefix(tmp_path):
    plain = train(tmp_path / "plain", *PACKED, "train.max_steps=2", "train.save_steps=2")
    checkpointed = train(tmp_path / "ckpt", *PACKED, "train.max_steps=2", "train.save_steps=2",
                         "model.gradient_checkpointing=true")
    a, b = prefix_of(plain.checkpoint), prefix_of(checkpointed.checkpoint)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_too_few_for_one_global_batch_names_the_keys_in_the_right_number_and_what_to_do():
    from ptuning.config import TrainJobConfig
    from ptuning.training import TrainingError
    from ptuning.training.loop import check_one_global_batch

    cfg = TrainJobConfig()
    cfg.data.packing, cfg.data.pack_length, cfg.train.per_device_batch_size = True, 100000000, 1
    check_one_global_batch(cfg, 2, 2)  # one global batch fits
    with pytest.raises(TrainingError) as few:
        check_one_global_batch(cfg, 1, 2)
    assert str(few.value) == (
        "the training set has 1 packed sequence of 100000000 tokens (data.pack_length=100000000), fewer than one "
        "global batch of 2 (train.per_device_batch_size=1 x 2 processes): lower data.pack_length or "
        "train.per_device_batch_size, or train on more rows")
    cfg.data.packing, cfg.train.per_device_batch_size = False, 8
    with pytest.raises(TrainingError) as few:
        check_one_global_batch(cfg, 3, 1)
    assert str(few.value) == ("the training set has 3 examples, fewer than one global batch of 8 (train."
                              "per_device_batch_size=8 x 1 process): lower train.per_device_batch_size, or train "
                              "on more rows")


def test_a_pack_length_shorter_than_a_row_or_too_few_packs_for_a_batch_is_one_line(tmp_path):
    from ptuning.training import TrainingError

    with pytest.raises(TrainingError, match=r"train.json: row \d+ has \d+ tokens, more than data.pack_length=16: "
                                            r"raise data.pack_length to at least the longest row$"):
        train(tmp_path / "short", "data.packing=true", "data.pack_length=16")
    with pytest.raises(TrainingError, match=r"^the training set has \d+ packed sequences? of 4096 tokens \(data.pack_length"
                                            r"=4096\), fewer than one global batch of 64 \(train.per_device_batch_size=64 "
                                            r"x 1 process\): lower data.pack_length or train.per_device_batch_size, "
                                            r"or train on more rows$"):
        train(tmp_path / "few", "data.packing=true", "data.pack_length=4096", "train.per_device_batch_size=64")
    for out in (tmp_path / "short", tmp_path / "few"):  # nothing written but the data cache
        assert [p.name for p in out.iterdir()] == [".cache"]
