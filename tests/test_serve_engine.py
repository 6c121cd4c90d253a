"""The serving engine, black-box: every row's tokens equal ``generate()`` of a model holding that row's prefix
alone, while rows of different prefixes (and the bare base model) share batches, join, finish and are cancelled
at different steps; seeded sampling does not depend on the batch; bad requests are refused. For ChatGLM-6B's
tiny model and transformers' own decoders (tiny random configs)."""

from __future__ import annotations

import copy

import pytest
import torch

from ptuning.prefix import PrefixEncoder, prefix_module_name, reset_prefix
from ptuning.serve import Engine, EngineFull, EngineRequest, PrefixBank

from .common import ROOT
from .test_hf_prefix import ARCHITECTURES, plain_model

# name -> (pre_seq_len, prefix_projection); None is the bare base model
PREFIXES = {"p3": (3, False), "p5proj": (5, True), "p8": (8, False)}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_module):
    """In-process model runs of this module use one intra-op thread (see ``one_thread_module``)."""


class Setup:
    """A family's base model (no prefix of its own), models holding one prefix each, prompts and ids."""

    def __init__(self, base, shape_of, with_prefix, prompts, pad_id, stop_ids, max_length):
        self.base, self.pad_id, self.stop_ids, self.prompts, self.max_length = base, pad_id, stop_ids, prompts, max_length
        self.encoders, self.models = {}, {None: base}
        for i, (name, (length, projection)) in enumerate(PREFIXES.items()):
            torch.manual_seed(10 + i)
            encoder = PrefixEncoder(shape_of(length, projection))
            reset_prefix(encoder)
            with torch.no_grad():  # larger than the initial N(0, 1), so each prefix visibly changes the answers
                for param in (encoder.trans[2] if projection else encoder.embedding).parameters():
                    param.mul_(3.0)
            self.encoders[name] = encoder
            self.models[name] = with_prefix(length, projection, encoder)
        with torch.no_grad():
            self.bank = PrefixBank(shape_of(1, False), {n: e() for n, e in self.encoders.items()},
                                   dtype=torch.float32)

    def engine(self, max_batch_size: int) -> Engine:
        return Engine(self.base, self.bank, max_batch_size=max_batch_size, max_length=self.max_length,
                      pad_token_id=self.pad_id)

    def alone(self, prefix, prompt, max_new_tokens) -> list[int]:
        """Greedy ``generate()`` of the model holding ``prefix``, for this prompt alone, up to its first stop id."""
        ids = torch.tensor([prompt])
        out = self.models[prefix].generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                           max_new_tokens=max_new_tokens, eos_token_id=list(self.stop_ids),
                                           pad_token_id=self.pad_id)[0, len(prompt):].tolist()
        stops = [i for i, t in enumerate(out) if t in self.stop_ids]
        return out[: stops[0]] if stops else out


def chatglm_setup() -> Setup:
    from ptuning.build import load
    from ptuning.config import ModelConfig
    from ptuning.models import Conversation

    loaded = load(ModelConfig(), pre_seq_len=None, init=False)
    base, family, template = loaded.model.eval(), loaded.family, loaded.template

    def with_prefix(length, projection, encoder):
        model = load(ModelConfig(pre_seq_len=length, prefix_projection=projection), init=False).model.eval()
        model.get_submodule(prefix_module_name(model)).load_state_dict(encoder.state_dict())
        return model

    import json

    rows = (ROOT / "data" / "adgen_sample" / "dev.json").read_text(encoding="utf-8").splitlines()[:6]
    prompts = [template.prompt(Conversation(query=json.loads(r)["content"]), 200).ids for r in rows]
    prompts.append(template.prompt(Conversation(query="你好"), 200).ids)  # a short one
    return Setup(base, lambda n, proj: family.prefix_shape(base.config, n, proj), with_prefix, prompts,
                 template.pad_token_id, template.stop_token_ids, loaded.max_positions)


def hf_setup(arch: str) -> Setup:
    from ptuning.models.hf import attach_prefix, prefix_shape

    plain = plain_model(arch)
    base = attach_prefix(copy.deepcopy(plain), None).eval()

    def with_prefix(length, projection, encoder):
        model = attach_prefix(copy.deepcopy(plain), prefix_shape(plain.config, length, projection)).eval()
        model.prefix_encoder.load_state_dict(encoder.state_dict())
        return model

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, plain.config.vocab_size, (n,), generator=g).tolist() for n in (9, 4, 13, 6, 2, 11, 7)]
    return Setup(base, lambda n, proj: prefix_shape(plain.config, n, proj), with_prefix, prompts, 0, [2],
                 plain.config.max_position_embeddings)


FAMILIES = ["chatglm", "Qwen3ForCausalLM", "GlmForCausalLM"]
assert set(FAMILIES[1:]) <= set(ARCHITECTURES)


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request) -> Setup:
    return chatglm_setup() if request.param == "chatglm" else hf_setup(request.param)


def drive(engine: Engine, requests: list[EngineRequest], per_step: int, cancel: dict[int, int] | None = None):
    """Adds up to ``per_step`` waiting requests before each step (as many as slots allow) and steps until all
    are done. ``cancel``: request index -> the step after which it is cancelled. Returns each request's
    tokens (stop ids left out) and finish reason."""
    cancel = cancel or {}
    tokens: dict[int, list[int]] = {}
    reasons: dict[int, str] = {}
    by_slot: dict[int, int] = {}
    waiting = list(range(len(requests)))
    step = 0
    while waiting or engine.active:
        for _ in range(per_step):
            if waiting and engine.free_slots:
                index = waiting.pop(0)
                by_slot[engine.add(requests[index])] = index
                tokens[index] = []
        for out in engine.step():
            index = by_slot[out.slot]
            if out.finish_reason != "stop":
                tokens[index].append(out.token_id)
            if out.finish_reason:
                reasons[index] = out.finish_reason
                del by_slot[out.slot]
        step += 1
        for index, after in cancel.items():
            if after == step:
                slot = next(s for s, i in by_slot.items() if i == index)
                free = engine.free_slots
                assert engine.cancel(slot) and engine.free_slots == free + 1
                del by_slot[slot]
                reasons[index] = "cancelled"
        assert step < 1000
    return tokens, reasons


def test_greedy_rows_equal_generate_alone_while_prefixes_share_batches(setup):
    names = [None, *PREFIXES]
    requests = [
        EngineRequest(prompt, names[i % len(names)], max_new_tokens=6 + 5 * (i % 4), stop_token_ids=setup.stop_ids)
        for i, prompt in enumerate(setup.prompts * 2)
    ]
    engine = setup.engine(max_batch_size=5)  # fewer slots than requests: rows wait, join and leave
    tokens, reasons = drive(engine, requests, per_step=2, cancel={3: 4})
    assert engine.active == 0 and engine.free_slots == 5
    for i, request in enumerate(requests):
        if i == 3:
            assert reasons[i] == "cancelled" and 0 < len(tokens[i]) < request.max_new_tokens
            continue
        want = setup.alone(request.prefix, list(request.prompt_ids), request.max_new_tokens)
        assert tokens[i] == want, (i, request.prefix)
        assert reasons[i] == ("length" if len(want) == request.max_new_tokens else "stop")
    # the prefixes answer differently, so a row that saw another row's prefix would show
    answers = {name: [tokens[i] for i, r in enumerate(requests) if r.prefix == name and i != 3] for name in names}
    assert len({str(a) for a in answers.values()}) == len(names)


def test_seeded_sampling_does_not_depend_on_the_batch(setup):
    def sample(seed, company: int):
        engine = setup.engine(max_batch_size=8)
        mine = EngineRequest(setup.prompts[0], "p5proj", 12, temperature=0.9, top_p=0.8, seed=seed)
        others = [EngineRequest(p, name, 12, temperature=1.0, seed=100 + k)
                  for k, (p, name) in enumerate(zip(setup.prompts[1:company + 1], ["p3", None, "p8"] * 2, strict=False))]
        tokens, _ = drive(engine, [*others[:1], mine, *others[1:]], per_step=8)
        return tokens[1 if others else 0]

    alone = sample(5, 0)
    assert sample(5, 4) == alone == sample(5, 2)
    assert sample(6, 0) != alone


def test_bad_requests_are_refused(setup):
    engine = setup.engine(max_batch_size=2)
    prompt = setup.prompts[0]
    with pytest.raises(KeyError):
        engine.add(EngineRequest(prompt, "no-such-prefix"))
    with pytest.raises(ValueError, match="exceed the model's"):
        engine.add(EngineRequest(prompt, None, max_new_tokens=setup.max_length))
    with pytest.raises(ValueError, match="empty prompt"):
        engine.add(EngineRequest([], None))
    with pytest.raises(ValueError, match="temperature"):
        engine.add(EngineRequest(prompt, None, temperature=-1))
    slots = {engine.add(EngineRequest(prompt, "p3")), engine.add(EngineRequest(prompt, None))}
    assert slots == {0, 1} and engine.free_slots == 0
    with pytest.raises(EngineFull):
        engine.add(EngineRequest(prompt, None))
    assert engine.cancel(0) and not engine.cancel(0) and engine.free_slots == 1
    assert len(engine.step()) == 1  # the one left
    assert engine.cancel_all() == [1] and engine.active == 0


def test_ids_the_tokenizer_cannot_decode_are_never_chosen(setup):
    vocab = setup.base.get_input_embeddings().weight.shape[0]
    limit = vocab // 3
    engine = Engine(setup.base, setup.bank, max_batch_size=4, max_length=setup.max_length,
                    pad_token_id=setup.pad_id, vocab_limit=limit)
    requests = [EngineRequest(p, name, 16, temperature=t, seed=1)
                for p, name, t in zip(setup.prompts, [None, "p3", "p8", None], [0.0, 0.0, 1.5, 2.0], strict=False)]
    tokens, _ = drive(engine, requests, per_step=4)
    chosen = [t for row in tokens.values() for t in row]
    assert len(chosen) > 16 and max(chosen) < limit
    unlimited, _ = drive(setup.engine(max_batch_size=4), requests, per_step=4)
    assert max(t for row in unlimited.values() for t in row) >= limit  # the limit did change something


@pytest.mark.parametrize("model", ["tiny-chatglm", "tiny-glm4"])
def test_answer_text_leaves_out_control_tokens_and_a_character_cut_at_the_end(model):
    from ptuning.build import load
    from ptuning.config import ModelConfig
    from ptuning.serve.scheduler import Detokenizer

    template = load(ModelConfig(path=f"builtin:{model}"), pre_seq_len=None, init=False).template
    tokenizer = template.tokenizer

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    rare = encode("龘")  # no piece of its own: spelled by its bytes
    assert len(rare) >= 3 and "\ufffd" in tokenizer.decode(rare[:-1])
    gmask = tokenizer.convert_tokens_to_ids("[gMASK]")
    assert gmask in template.control_token_ids
    full = encode("这条裙子很好看龘")
    assert full[-2:] == rare[-2:]
    cut = full[:-1]  # max_tokens ended the answer inside its last character
    ids = cut[:2] + [gmask] + cut[2:]  # and the model wrote a control token on the way (with ignore_eos)
    detok = Detokenizer(tokenizer, frozenset(template.control_token_ids))
    streamed = "".join(detok.push(i) for i in ids)
    assert detok.whole().strip() == streamed.strip() == "这条裙子很好看"
    assert template.decode(cut) == "这条裙子很好看"  # evaluation drops the cut character too
    # a character completed later is kept, and one never completed inside the answer stays U+FFFD
    detok = Detokenizer(tokenizer, frozenset(template.control_token_ids))
    text = "".join(detok.push(i) for i in full[:-1] + full)
    assert detok.whole() == text and text.endswith("龘") and "\ufffd" in text
