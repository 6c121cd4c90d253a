"""Code that runs on a GPU, checked on a CPU for the mistakes that only a GPU would show.

* Device discipline: every forward of every family (training with and without logits, with activation
  checkpointing, a padded prompt, a cached step from embeddings), the decode loop and the collators run with
  ``with torch.device("meta")`` around the call while the model and the inputs stay on the CPU. A tensor
  created without ``device=`` then lands on the meta device and the first operation that mixes it with a CPU
  tensor fails, as a CPU tensor meeting CUDA ones would on a GPU.
* Host syncs: the decode loop reads the device once per decode step (the new tokens), whatever the rows,
  their sampling and the layers, and a prefill's reads do not grow with the layers. Reads are counted where
  torch sees them (``tolist``, ``item``, ``bool(tensor)``, ``nonzero``, boolean-mask indexing, ...).
"""

from __future__ import annotations

import collections
import contextlib
import copy

import pytest
import torch
from torch.overrides import TorchFunctionMode

from ptuning.build import load
from ptuning.config import ModelConfig
from ptuning.data.collate import GenerationCollator, LengthGroupedSampler, TrainingCollator
from ptuning.evaluation.generate import GenerationSettings, generate_ids
from ptuning.generation import Decoder, PrefixTable, Request, Sampling, run_to_end
from ptuning.models import Conversation
from ptuning.models.chatglm import ChatGLMForConditionalGeneration, tiny_config
from ptuning.models.hf import attach_prefix, prefix_shape
from ptuning.prefix import PrefixKV

from .test_hf_prefix import ARCHITECTURES, plain_model
from .test_hf_prefix import COMMON as HF_COMMON

BUILTIN = ["tiny-chatglm", "tiny-chatglm2", "tiny-chatglm3", "tiny-glm4"]
FAMILIES = BUILTIN + sorted(ARCHITECTURES)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_module):
    """In-process model runs of this module use one intra-op thread (see ``one_thread_module``)."""


@contextlib.contextmanager
def meta_default_device():
    """Tensors made without ``device=`` go to the meta device while inside."""
    # ``with torch.device(...)`` pops its mode on exit; ``set_default_device(previous)`` would leave a "cpu"
    # device mode installed for the rest of the process, which changes what torch.compile traces
    with torch.device("meta"):
        yield


class Case:
    """A family's model with a prefix of 4, and prompts of its own template (or random ids)."""

    def __init__(self, name: str):
        self.name = name
        if name in BUILTIN:
            loaded = load(ModelConfig(path=f"builtin:{name}", pre_seq_len=4), init=True)
            self.model, template = loaded.model, loaded.template
            self.prompts = [template.prompt(Conversation(query=q), 64).ids
                            for q in ("类型#裙*颜色#黑色", "hello", "你好，请介绍一下你自己")]
            self.pad_id = template.pad_token_id
        else:
            plain = plain_model(name)
            torch.manual_seed(1)
            self.model = attach_prefix(copy.deepcopy(plain), prefix_shape(plain.config, 4))
            g = torch.Generator().manual_seed(0)
            self.prompts = [torch.randint(3, plain.config.vocab_size, (n,), generator=g).tolist() for n in (9, 4, 13)]
            self.pad_id = 0
        width = max(len(p) for p in self.prompts)
        self.ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in self.prompts])  # left-padded
        self.mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in self.prompts])
        self.labels = self.ids.clone()
        self.labels[:, : width // 2] = -100
        self.labels[self.mask == 0] = -100


@pytest.fixture(scope="module", params=FAMILIES)
def case(request) -> Case:
    return Case(request.param)


def test_training_forwards_create_every_tensor_on_the_inputs_device(case):
    model = case.model.train()
    for logits in (False, True):
        model.zero_grad()
        with meta_default_device():
            loss = model(input_ids=case.ids, labels=case.labels, return_logits=logits).loss
            loss.backward()
        assert loss.device.type == "cpu" and torch.isfinite(loss)
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert grads and all(g is not None and g.device.type == "cpu" for g in grads)
    model.activation_checkpointing_enable()
    try:
        with meta_default_device():
            loss = model(input_ids=case.ids, labels=case.labels, return_logits=False).loss
            loss.backward()
        assert loss.device.type == "cpu"
    finally:
        model.activation_checkpointing_disable()
        model.eval()


def test_packed_training_forwards_create_every_tensor_on_the_inputs_device(case):
    model = case.model.train()
    rows = [{"input_ids": p, "labels": [-100] + p[1:]} for p in case.prompts]
    pack = {"input_ids": [t for r in rows for t in r["input_ids"]], "labels": [t for r in rows for t in r["labels"]],
            "sequence_ids": [n for n, r in enumerate(rows) for _ in r["input_ids"]]}
    with meta_default_device():
        batch = TrainingCollator(pad_token_id=case.pad_id, pack_length=len(pack["input_ids"]) + 3)([pack])
        model.zero_grad()
        loss = model(**batch, return_logits=False).loss
        loss.backward()
    assert all(t.device.type == "cpu" for t in batch.values())
    assert loss.device.type == "cpu" and torch.isfinite(loss)
    model.eval()


def test_inference_forwards_create_every_tensor_on_the_inputs_device(case):
    model = case.model.eval()
    with torch.no_grad(), meta_default_device():
        out = model(input_ids=case.ids, attention_mask=case.mask, use_cache=True)
    assert out.logits.device.type == "cpu"
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    # two more tokens from their embeddings (no input_ids), after the cache, with the padding mask
    positions = model.prompt_position_ids(case.ids, case.mask)
    step = model.next_position_ids(positions[..., -1:])
    positions = torch.cat([step, model.next_position_ids(step)], dim=-1)
    embeds = model.get_input_embeddings()(case.ids[:, -2:])
    mask = torch.cat([case.mask, torch.ones(len(case.prompts), 2, dtype=torch.long)], dim=1)
    with torch.no_grad(), meta_default_device():
        step_out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache,
                         use_cache=True)
    assert step_out.logits.device.type == "cpu" and torch.isfinite(step_out.logits).all()


def test_the_decode_loop_creates_every_tensor_on_the_models_device(case):
    model = case.model.eval()
    own = model.prefix_key_values(1, torch.float32)
    g = torch.Generator().manual_seed(2)
    rows = len(case.prompts)
    mixed = PrefixKV([torch.randn(rows, *k.shape[1:], generator=g) for k in own.keys],
                     [torch.randn(rows, *v.shape[1:], generator=g) for v in own.values],
                     torch.tensor([[True] * 4, [True, True, False, False], [False] * 4]))
    with meta_default_device():
        decoder = Decoder(model, max_batch_size=2, max_length=80)  # fewer slots than rows: rows join later
        out = run_to_end(decoder, [Request(case.prompts[0], 6), Request(case.prompts[1], 4, Sampling(0.8, seed=1))])
        out += run_to_end(decoder, [Request(case.prompts[2], 5)])
        mixed_decoder = Decoder(model, max_batch_size=rows, max_length=80, prefixes=PrefixTable(mixed))
        out += run_to_end(mixed_decoder, [Request(p, 3, prefix=i) for i, p in enumerate(case.prompts)])
        ids = generate_ids(model, case.prompts, GenerationSettings(max_new_tokens=3), pad_id=case.pad_id,
                           stop_ids=[], vocab_limit=model.get_input_embeddings().weight.shape[0] - 1)
    assert [len(tokens) for tokens, _ in out] == [6, 4, 5, 3, 3, 3] and [len(x) for x in ids] == [3, 3, 3]


def test_collators_and_the_sampler_build_batches_on_the_host():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "reference": "a"},
            {"input_ids": [8], "labels": [8], "reference": "b"}]
    with meta_default_device():
        train = TrainingCollator(pad_token_id=0)(rows)
        gen = GenerationCollator(pad_token_id=0)(rows)
        order = list(LengthGroupedSampler([3, 1, 2, 5], batch_size=2, seed=0))
    assert all(t.device.type == "cpu" for t in [*train.values(), gen["input_ids"], gen["attention_mask"]])
    assert train["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]] and gen["attention_mask"].tolist() == [[1, 1, 1],
                                                                                                       [0, 0, 1]]
    assert sorted(order) == [0, 1, 2, 3]


# ---------------------------------------------------------------- host syncs


READS = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__,
         torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero, torch.Tensor.cpu, torch.masked_select,
         torch.Tensor.masked_select, torch.Tensor.numpy}


class HostReads(TorchFunctionMode):
    """Counts the torch calls that read a tensor's values to the host (on a GPU, each waits for the device)."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        read = func in READS
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__):  # boolean-mask indexing sizes its output
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            read = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
        if read:
            self.count += 1
            self.calls[getattr(func, "__name__", str(func))] += 1
        return func(*args, **(kwargs or {}))


def reads_per_step(model, prompts, samplings) -> tuple[int, list[int]]:
    """Host reads of the first step (the prefill) and of each later (decode) step."""
    decoder = Decoder(model, max_batch_size=len(prompts), max_length=96)
    for prompt, sampling in zip(prompts, samplings, strict=True):
        decoder.add(Request(prompt, 6, sampling))
    steps = []
    while decoder.active:
        with HostReads() as reads:
            decoder.step()
        steps.append(reads.count)
    return steps[0], steps[1:]


def sized_model(family: str, layers: int):
    """A random ChatGLM-6B or Llama of ``layers`` layers with a prefix of 4, and three prompts for it."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if family == "chatglm":
        config = tiny_config(num_layers=layers, pre_seq_len=4)
        model = ChatGLMForConditionalGeneration(config).eval()
        prompts = [torch.randint(5, 900, (n,), generator=g).tolist() + [config.gmask_token_id, config.bos_token_id]
                   for n in (7, 2, 11)]
        return model, prompts
    config_cls, model_cls, extra = ARCHITECTURES["LlamaForCausalLM"]
    config = config_cls(**{**HF_COMMON, "num_hidden_layers": layers}, **extra)
    config._attn_implementation = "sdpa"
    model = attach_prefix(model_cls(config), prefix_shape(config, 4)).eval()
    return model, [torch.randint(3, config.vocab_size, (n,), generator=g).tolist() for n in (9, 4, 13)]


@pytest.mark.parametrize("family", ["chatglm", "llama"])
def test_a_decode_step_reads_the_device_once_and_a_prefill_does_not_read_per_layer(family):
    samplings = [Sampling(), Sampling(temperature=0.9, seed=1), Sampling(temperature=0.7, top_p=0.8, seed=2)]
    prefills = []
    for layers in (2, 4):
        model, prompts = sized_model(family, layers)
        prefill, decode = reads_per_step(model, prompts, samplings)
        assert decode and set(decode) == {1}, decode  # the tokens (and the sampled rows' finiteness) in one read
        prefills.append(prefill)
    assert prefills[0] == prefills[1], prefills  # twice the layers, no more reads
