"""The server's decode loop, black-box: every row's tokens equal ``generate()`` of a model holding that row's
prefix alone, while rows of different prefixes of a bank (and the bare base model) share batches, join, finish
and are cancelled at different steps; seeded sampling does not depend on the batch; bad requests are refused.
For ChatGLM-6B's tiny model and transformers' own decoders (tiny random configs). Then the decode thread:
answer text, a cache that cannot grow, the CUDA device and CUDA errors (mocked on a CPU)."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from ptuning.generation import Decoder, DecoderFull, Request, Sampling
from ptuning.prefix import PrefixEncoder, prefix_module_name, reset_prefix
from ptuning.serve.engine import PrefixBank, serving_decoder
from ptuning.serve.scheduler import Delta, Failure, Finish, Job, Scheduler, is_device_fault

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

    def engine(self, max_batch_size: int, **kwargs) -> Decoder:
        return serving_decoder(self.base, self.bank, max_batch_size=max_batch_size, max_length=self.max_length,
                               pad_token_id=self.pad_id, **kwargs)

    def request(self, prompt, prefix: str | None, max_new_tokens: int = 64, *, temperature: float = 0.0,
                top_p: float = 1.0, seed: int | None = None, stop_token_ids=()) -> Request:
        """A request for the prefix named ``prefix`` (None: the bare base model), as the server makes one."""
        return Request(list(prompt), max_new_tokens, Sampling(temperature=temperature, top_p=top_p, seed=seed),
                       stop_token_ids=list(stop_token_ids), prefix=self.bank.index(prefix))

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


def drive(engine: Decoder, requests: list[Request], per_step: int, cancel: dict[int, int] | None = None):
    """Adds up to ``per_step`` waiting requests before each step (as many as slots allow) and steps until all
    are done. ``cancel``: request index -> the step after which it is cancelled. Returns each request's
    tokens (stop ids left out) and finish reason."""
    cancel = cancel or {}
    tokens: dict[int, list[int]] = {}
    reasons: dict[int, str] = {}
    by_handle: dict[int, int] = {}
    waiting = list(range(len(requests)))
    step = 0
    while waiting or engine.active:
        for _ in range(per_step):
            if waiting and engine.free_slots:
                index = waiting.pop(0)
                by_handle[engine.add(requests[index])] = index
                tokens[index] = []
        for out in engine.step():
            index = by_handle[out.handle]
            if out.finish_reason != "stop":
                tokens[index].append(out.token_id)
            if out.finish_reason:
                reasons[index] = out.finish_reason
                del by_handle[out.handle]
        step += 1
        for index, after in cancel.items():
            if after == step:
                handle = next(h for h, i in by_handle.items() if i == index)
                free = engine.free_slots
                assert engine.cancel(handle) and engine.free_slots == free + 1
                del by_handle[handle]
                reasons[index] = "cancelled"
        assert step < 1000
    return tokens, reasons


def test_greedy_rows_equal_generate_alone_while_prefixes_share_batches(setup):
    names = [None, *PREFIXES]
    prefix_of = [names[i % len(names)] for i in range(2 * len(setup.prompts))]
    requests = [
        setup.request(prompt, prefix_of[i], max_new_tokens=6 + 5 * (i % 4), stop_token_ids=setup.stop_ids)
        for i, prompt in enumerate(setup.prompts * 2)
    ]
    engine = setup.engine(max_batch_size=5)  # fewer slots than requests: rows wait, join and leave
    tokens, reasons = drive(engine, requests, per_step=2, cancel={3: 4})
    assert engine.active == 0 and engine.free_slots == 5
    for i, request in enumerate(requests):
        if i == 3:
            assert reasons[i] == "cancelled" and 0 < len(tokens[i]) < request.max_new_tokens
            continue
        want = setup.alone(prefix_of[i], list(request.prompt_ids), request.max_new_tokens)
        assert tokens[i] == want, (i, prefix_of[i])
        assert reasons[i] == ("length" if len(want) == request.max_new_tokens else "stop")
    # the prefixes answer differently, so a row that saw another row's prefix would show
    answers = {name: [tokens[i] for i in range(len(requests)) if prefix_of[i] == name and i != 3] for name in names}
    assert len({str(a) for a in answers.values()}) == len(names)


def test_seeded_sampling_does_not_depend_on_the_batch(setup):
    def sample(seed, company: int):
        engine = setup.engine(max_batch_size=8)
        mine = setup.request(setup.prompts[0], "p5proj", 12, temperature=0.9, top_p=0.8, seed=seed)
        others = [setup.request(p, name, 12, temperature=1.0, seed=100 + k)
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
        setup.request(prompt, "no-such-prefix")
    with pytest.raises(ValueError, match="prefix index 9: expected 0 .. 3"):
        engine.add(Request(prompt, 4, prefix=9))
    with pytest.raises(ValueError, match="exceed the model's"):
        engine.add(setup.request(prompt, None, max_new_tokens=setup.max_length))
    with pytest.raises(ValueError, match="empty prompt"):
        engine.add(setup.request([], None))
    with pytest.raises(ValueError, match="temperature"):
        engine.add(setup.request(prompt, None, temperature=-1))
    handles = [engine.add(setup.request(prompt, "p3")), engine.add(setup.request(prompt, None))]
    assert engine.free_slots == 0
    with pytest.raises(DecoderFull):
        engine.add(setup.request(prompt, None))
    assert engine.cancel(handles[0]) and not engine.cancel(handles[0]) and engine.free_slots == 1
    assert len(engine.step()) == 1  # the one left
    assert engine.cancel_all() == [handles[1]] and engine.active == 0


def test_ids_the_tokenizer_cannot_decode_are_never_chosen(setup):
    vocab = setup.base.get_input_embeddings().weight.shape[0]
    limit = vocab // 3
    engine = setup.engine(max_batch_size=4, vocab_limit=limit)
    requests = [setup.request(p, name, 16, temperature=t, seed=1)
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
    from ptuning.generation import Detokenizer

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
    assert streamed + detok.finish() == detok.text
    assert detok.text.strip() == streamed.strip() == "这条裙子很好看"
    assert template.decode(cut) == "这条裙子很好看"  # evaluation drops the cut character too
    # a character completed later is kept, and one never completed inside the answer stays U+FFFD
    detok = Detokenizer(tokenizer, frozenset(template.control_token_ids))
    text = "".join(detok.push(i) for i in full[:-1] + full)
    assert detok.finish() == "" and detok.text == text and text.endswith("龘") and "\ufffd" in text


# ---------------------------------------------------------------- the decode thread


class Events:
    """A job's stream that records its events (the scheduler thread puts them)."""

    def __init__(self):
        self.events: list = []
        self.done = threading.Event()

    def put(self, event) -> None:
        self.events.append(event)
        if not isinstance(event, Delta):
            self.done.set()


@pytest.fixture(scope="module")
def tiny():
    from ptuning.build import load
    from ptuning.config import ModelConfig

    loaded = load(ModelConfig(), pre_seq_len=None, init=False)
    loaded.model.eval()
    return loaded


def job(tiny, query: str, max_new_tokens: int) -> Job:
    from ptuning.models import Conversation

    ids = tiny.template.prompt(Conversation(query=query), 200).ids
    return Job(Request(ids, max_new_tokens, stop_token_ids=tiny.template.stop_token_ids), Events())


def scheduler_for(tiny, max_batch_size: int = 4) -> Scheduler:
    bank = PrefixBank(tiny.family.prefix_shape(tiny.model.config, 1, False), {}, dtype=torch.float32)
    decoder = serving_decoder(tiny.model, bank, max_batch_size=max_batch_size, max_length=tiny.max_positions,
                              pad_token_id=tiny.template.pad_token_id)
    return Scheduler(decoder, tiny.template.tokenizer, idle_wait=0.01)


def run_jobs(scheduler: Scheduler, jobs: list[Job], timeout: float = 60.0) -> None:
    scheduler.submit(jobs)
    for j in jobs:
        assert j.stream.done.wait(timeout), "no answer"


def test_a_request_whose_cache_cannot_grow_gets_a_503_and_the_running_rows_go_on(tiny, monkeypatch):
    from ptuning.generation import cache as cache_module

    scheduler = scheduler_for(tiny)
    scheduler.start()
    try:
        short = job(tiny, "你好", 8)
        run_jobs(scheduler, [short])  # the cache now holds what a short answer needs
        capacity = scheduler.decoder.cache.capacity
        calls, real = [0], cache_module._allocate

        def third_fails(shape, dtype, device):
            calls[0] += 1
            if calls[0] == 3:  # layer 1's keys: layer 0's new buffers exist already
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return real(shape, dtype, device)

        monkeypatch.setattr(cache_module, "_allocate", third_fails)
        running, long = job(tiny, "类型#裙", 6), job(tiny, "类型#裙*颜色#黑色", capacity + 40)
        run_jobs(scheduler, [running, long])
        (failure,) = long.stream.events
        assert isinstance(failure, Failure) and failure.status == 503
        assert failure.message.startswith("not enough memory for this request now: a generation cache of 4 rows x ")
        assert "out of memory" in failure.message and f"keeps its {capacity} tokens per row" in failure.message
        assert isinstance(running.stream.events[-1], Finish)  # the other request was answered in full
        cache = scheduler.decoder.cache
        assert cache.capacity == capacity and len(cache.keys) == len(cache.values) == cache.num_layers
        assert {k.shape[2] for k in cache.keys + cache.values} == {cache.room + capacity}
        monkeypatch.setattr(cache_module, "_allocate", real)
        again = job(tiny, "类型#裙", 6)
        run_jobs(scheduler, [again])
        text = "".join(e.text for e in again.stream.events if isinstance(e, Delta))
        assert text == "".join(e.text for e in running.stream.events if isinstance(e, Delta))
    finally:
        scheduler.stop(timeout=10)


def test_the_decode_thread_makes_the_decoders_gpu_its_current_device(tiny, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append((device, threading.current_thread().name)))
    scheduler = scheduler_for(tiny)
    scheduler.decoder.device = torch.device("cuda", 1)  # what the thread reads (the model stays on the CPU)
    scheduler.start()
    scheduler.stop(drain=True, timeout=10)
    assert calls == [(torch.device("cuda", 1), "ptuning-serve-decode")]


def test_after_a_cuda_error_health_fails_and_requests_are_refused(tiny, monkeypatch):
    from fastapi.testclient import TestClient

    from ptuning.serve.app import create_app
    from ptuning.serve.service import Service

    scheduler = scheduler_for(tiny)
    service = Service(scheduler, tiny.template, base_name="base", prefixes=[], max_length=tiny.max_positions)
    real_step = scheduler.decoder.step
    steps = [0]

    def assert_on_the_third_step():
        steps[0] += 1
        if steps[0] == 3:
            raise torch.AcceleratorError("CUDA error: device-side assert triggered\nCompile with TORCH_USE_CUDA_DSA")
        return real_step()

    monkeypatch.setattr(scheduler.decoder, "step", assert_on_the_third_step)
    body = {"model": "base", "prompt": "类型#裙", "max_tokens": 8, "temperature": 0}
    with TestClient(create_app(service, web=False)) as client:
        assert client.get("/health").status_code == 200
        failed = client.post("/v1/completions", json=body)
        assert failed.status_code == 503
        assert "device-side assert triggered" in failed.json()["error"]["message"]
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "error"
        assert health.json()["error"] == "AcceleratorError: CUDA error: device-side assert triggered"
        refused = client.post("/v1/completions", json=body)
        assert refused.status_code == 503 and "takes no more requests" in refused.json()["error"]["message"]
    assert steps[0] == 3  # nothing ran on the broken device after the error


def test_out_of_memory_is_not_a_broken_device():
    assert is_device_fault(torch.AcceleratorError("CUDA error: an illegal memory access was encountered"))
    assert is_device_fault(RuntimeError("CUDA error: device-side assert triggered"))
    assert not is_device_fault(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    assert not is_device_fault(RuntimeError("shape mismatch"))


def test_a_batch_whose_cache_cannot_fit_is_refused_before_the_model_loads(monkeypatch, capsys):
    import ptuning.serve.cli
    from ptuning.generation import memory
    from ptuning.serve.cli import main

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(ptuning.serve.cli, "load_folder", no_load)
    assert main(["--max-batch-size", "100000", "--port", "0", "--no-web"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: --max-batch-size=100000: a generation cache of 100000 rows x 512 positions "
                           "(512 tokens + 0 prefix) needs ")
    fits = int(line.split("at most ")[1].split()[0])
    assert f"use --max-batch-size {fits} (or a smaller --max-length;" in line and 0 < fits < 100000
    # the number given fits (with the same free memory), one more does not
    free = memory.available_bytes("cpu")
    monkeypatch.setattr(memory, "available_bytes", lambda device: free)
    from ptuning.build import model_family
    from ptuning.config import ModelConfig
    from ptuning.serve.cli import check_cache_memory, parse_args

    family = model_family(ModelConfig())
    config = family.model_config(ModelConfig().resolved_path)
    assert check_cache_memory(parse_args(["--max-batch-size", str(fits)]), family, config, "cpu", torch.float32,
                              0) == 512
    from ptuning.config import ConfigError

    with pytest.raises(ConfigError, match=f"at most {fits} rows fit"):
        check_cache_memory(parse_args(["--max-batch-size", str(fits + 1)]), family, config, "cpu", torch.float32, 0)
    # a shorter --max-length lets more rows fit; a longer one than the model's positions is refused
    assert check_cache_memory(parse_args(["--max-batch-size", str(2 * fits), "--max-length", "256"]), family,
                              config, "cpu", torch.float32, 0) == 256
    with pytest.raises(ConfigError, match="--max-length=1024: the model has 512 positions"):
        check_cache_memory(parse_args(["--max-length", "1024"]), family, config, "cpu", torch.float32, 0)
