"""Our decode loop (ptuning.generation): the same ids as transformers' generate() for greedy decoding, for
ChatGLM-6B and transformers' own decoders, batched with left padding / different prompt lengths, without a
prefix, with the model's own prefix and with a different prefix per row; rows joining and leaving between
steps; seeded sampling; stop ids, stop strings and max_new_tokens per row; the slot cache itself."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GlmConfig, GlmForCausalLM, LlamaConfig, LlamaForCausalLM

from ptuning.evaluation.generate import (
    GenerationSettings,
    generate_ids,
    left_pad,
    stream_ids,
    strip_generated,
)
from ptuning.generation import (
    ERROR,
    LENGTH,
    STOP,
    Decoder,
    DecoderFull,
    PrefixTable,
    Request,
    Sampling,
    SlotCache,
    default_cache_dtype,
    packed_linears,
    packing_available,
    run_to_end,
    top_p_probabilities,
)
from ptuning.generation import loop as decode_loop
from ptuning.generation.sampling import choose_tokens
from ptuning.models.chatglm import ChatGLMForConditionalGeneration
from ptuning.models.hf import attach_prefix, prefix_shape
from ptuning.prefix import PrefixKV, cast_backbone

from .common import ASSETS

PTUNING = ASSETS / "parity" / "tiny-ptuning"  # ChatGLM-6B, pre_seq_len 4
BASE = ASSETS / "parity" / "tiny-base"  # ChatGLM-6B without a prefix
HF_VOCAB = 96
HF_COMMON = dict(
    vocab_size=HF_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    tie_word_embeddings=False,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_module):
    """In-process model runs of this module use one intra-op thread (see ``one_thread_module``)."""


@pytest.fixture(scope="module")
def chatglm():
    return ChatGLMForConditionalGeneration.from_pretrained(PTUNING)


@pytest.fixture(scope="module")
def chatglm_base():
    return ChatGLMForConditionalGeneration.from_pretrained(BASE)


def hf_model(arch: str, pre_seq_len: int):
    """A tiny transformers decoder with our prefix attention (and a prefix of a scale that leaves the prompt a
    say in the answer)."""
    config_cls, model_cls, extra = {
        "llama": (LlamaConfig, LlamaForCausalLM, {}),
        # GLM: what ChatGLM2/3 checkpoints map onto; partial rotary, GQA
        "glm": (GlmConfig, GlmForCausalLM, dict(head_dim=8, partial_rotary_factor=0.5)),
    }[arch]
    config = config_cls(**HF_COMMON, **extra)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = model_cls(config).eval()
    model = attach_prefix(model, prefix_shape(config, pre_seq_len) if pre_seq_len else None)
    if pre_seq_len:
        with torch.no_grad():
            model.prefix_encoder.embedding.weight.mul_(0.3)
    return model.eval()


def chatglm_prompts(config, lengths=(7, 2, 11), seed=1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 900, (n,), generator=g).tolist() + [config.gmask_token_id, config.bos_token_id]
            for n in lengths]


def hf_prompts(lengths=(7, 2, 11), seed=1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, HF_VOCAB, (n,), generator=g).tolist() for n in lengths]


def reference_ids(model, prompts, *, pad_id, stop_ids, max_new_tokens=10, prefix=None) -> list[list[int]]:
    """transformers' generate() on the left-padded batch, greedy, cut at the first stop id."""
    ids, mask = left_pad(prompts, pad_id)
    extra = {"prefix": prefix} if prefix is not None else {}
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=list(stop_ids), pad_token_id=pad_id, **extra)
    return [strip_generated(row[ids.shape[1]:].tolist(), stop_ids, pad_id) for row in out]


def mixed_prefix(model, rows: int, seed: int = 3) -> PrefixKV:
    """A different prefix per row: row 0 a full one, row 1 a shorter one (its last columns hidden), row 2 none
    (every column hidden)."""
    own = model.prefix_key_values(1, torch.float32) if getattr(model, "prefix_encoder", None) is not None else None
    if own is None:
        own = model.transformer.prefix_key_values(1, torch.float32)
    g = torch.Generator().manual_seed(seed)
    keys = [torch.randn(rows, *k.shape[1:], generator=g) * 0.5 for k in own.keys]
    values = [torch.randn(rows, *v.shape[1:], generator=g) * 0.5 for v in own.values]
    length = own.length
    mask = torch.ones(rows, length, dtype=torch.bool)
    mask[1, length // 2:] = False
    mask[2] = False
    return PrefixKV(keys, values, mask)


def stop_in_the_middle(outputs: list[list[int]]) -> int:
    """A token some row generates in the middle of its answer (so rows stop at different steps)."""
    return outputs[0][len(outputs[0]) // 2]


# ---------------------------------------------------------------- the same ids as generate()


@pytest.mark.parametrize("which", ["prefix", "base"])
def test_chatglm_greedy_ids_equal_generate_for_a_left_padded_batch(which, chatglm, chatglm_base):
    model = chatglm if which == "prefix" else chatglm_base
    cfg = model.config
    prompts = chatglm_prompts(cfg)
    want = reference_ids(model, prompts, pad_id=cfg.pad_token_id, stop_ids=[cfg.eos_token_id])
    got = generate_ids(model, prompts, GenerationSettings(max_new_tokens=10), pad_id=cfg.pad_token_id,
                       stop_ids=[cfg.eos_token_id])
    assert got == want
    assert len({tuple(r) for r in got}) == len(got)  # the rows answer differently: the comparison can fail
    # a stop id in the middle: rows leave the batch at different steps, the others go on unchanged
    stop = stop_in_the_middle(want)
    want = reference_ids(model, prompts, pad_id=cfg.pad_token_id, stop_ids=[stop])
    got = generate_ids(model, prompts, GenerationSettings(max_new_tokens=10), pad_id=cfg.pad_token_id, stop_ids=[stop])
    assert got == want
    assert len({len(r) for r in got}) > 1


def test_chatglm_rows_with_different_prefixes_equal_generate(chatglm):
    cfg = chatglm.config
    prompts = chatglm_prompts(cfg)
    prefix = mixed_prefix(chatglm, len(prompts))
    want = reference_ids(chatglm, prompts, pad_id=cfg.pad_token_id, stop_ids=[cfg.eos_token_id], prefix=prefix)
    got = generate_ids(chatglm, prompts, GenerationSettings(max_new_tokens=10), pad_id=cfg.pad_token_id,
                       stop_ids=[cfg.eos_token_id], prefix=prefix)
    assert got == want
    own = generate_ids(chatglm, prompts, GenerationSettings(max_new_tokens=10), pad_id=cfg.pad_token_id,
                       stop_ids=[cfg.eos_token_id])
    assert got != own  # the prefixes matter


@pytest.mark.parametrize("arch", ["llama", "glm"])
@pytest.mark.parametrize("prefix", ["none", "own", "mixed"])
def test_transformers_decoder_greedy_ids_equal_generate(arch, prefix):
    model = hf_model(arch, 0 if prefix == "none" else 3)
    prompts = hf_prompts()
    rows = mixed_prefix(model, len(prompts)) if prefix == "mixed" else None
    want = reference_ids(model, prompts, pad_id=0, stop_ids=[2], max_new_tokens=12, prefix=rows)
    got = generate_ids(model, prompts, GenerationSettings(max_new_tokens=12), pad_id=0, stop_ids=[2], prefix=rows)
    assert got == want
    assert len({tuple(r) for r in got}) == len(got)
    stop = stop_in_the_middle(want)
    want = reference_ids(model, prompts, pad_id=0, stop_ids=[stop], max_new_tokens=12, prefix=rows)
    got = generate_ids(model, prompts, GenerationSettings(max_new_tokens=12), pad_id=0, stop_ids=[stop], prefix=rows)
    assert got == want


def test_sliding_window_layers_see_only_their_window():
    """Qwen2 with a sliding-window layer: the decode steps hide the tokens outside the window, as generate()."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**HF_COMMON, use_sliding_window=True, sliding_window=5,
                         layer_types=["sliding_attention", "full_attention"])
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = attach_prefix(Qwen2ForCausalLM(config).eval(), None)
    prompts = hf_prompts()
    want = reference_ids(model, prompts, pad_id=0, stop_ids=[2], max_new_tokens=12)
    assert generate_ids(model, prompts, GenerationSettings(max_new_tokens=12), pad_id=0, stop_ids=[2]) == want
    wide = copy.deepcopy(model)
    wide.config.sliding_window = 1000
    for layer in wide.model.layers:
        if layer.self_attn.sliding_window:
            layer.self_attn.sliding_window = 1000
    assert generate_ids(wide, prompts, GenerationSettings(max_new_tokens=12), pad_id=0, stop_ids=[2]) != want


# ---------------------------------------------------------------- rows join and leave between steps


def alone(model, prompt, max_new_tokens, **kwargs) -> list[int]:
    decoder = Decoder(model, max_batch_size=1, max_length=64, **kwargs)
    ((ids, _),) = run_to_end(decoder, [Request(prompt, max_new_tokens)])
    return ids


@pytest.mark.parametrize("family", ["chatglm", "llama"])
def test_rows_joining_and_leaving_between_steps_get_what_they_get_alone(family, chatglm):
    model = chatglm if family == "chatglm" else hf_model("llama", 3)
    prompts = chatglm_prompts(model.config, (5, 9, 3, 6)) if family == "chatglm" else hf_prompts((5, 9, 3, 6))
    decoder = Decoder(model, max_batch_size=3, max_length=64, capacity=8)  # the cache must grow on the way
    got: dict[int, list[int]] = {}
    handles = [decoder.add(Request(prompts[0], 9)), decoder.add(Request(prompts[1], 4))]
    for step in range(14):
        if step == 2:
            handles.append(decoder.add(Request(prompts[2], 6)))  # joins while two rows run
        if step == 3:
            assert decoder.cancel(handles[0])  # leaves from the middle of the batch
        if step == 6:
            handles.append(decoder.add(Request(prompts[3], 5)))  # takes a freed slot
        for token in decoder.step():
            got.setdefault(token.handle, []).append(token.token_id)
    assert decoder.active == 0
    assert got[handles[1]] == alone(model, prompts[1], 4)
    assert got[handles[2]] == alone(model, prompts[2], 6)
    assert got[handles[3]] == alone(model, prompts[3], 5)
    assert got[handles[0]] == alone(model, prompts[0], 9)[:3]  # cancelled after 3 tokens


def test_finish_reasons_stop_ids_and_max_new_tokens_per_row(chatglm):
    cfg = chatglm.config
    prompts = chatglm_prompts(cfg)
    free = [alone(chatglm, p, 8) for p in prompts]
    stop = free[0][3]
    decoder = Decoder(chatglm, max_batch_size=3, max_length=64)
    results = run_to_end(decoder, [Request(prompts[0], 8, stop_token_ids=[stop]), Request(prompts[1], 2),
                                   Request(prompts[2], 5)])
    assert results[0] == (free[0][:3], STOP)
    assert results[1] == (free[1][:2], LENGTH)
    assert results[2] == (free[2][:5], LENGTH)


def test_stop_strings_end_the_row_where_the_text_appears():
    from ptuning.build import load_model, load_tokenizer
    from ptuning.config import ModelConfig

    model, tokenizer = load_model(ModelConfig()), load_tokenizer(ModelConfig())
    prompt = tokenizer.build_inputs_with_special_tokens(tokenizer.encode("类型#裙*颜色#黑色", add_special_tokens=False))
    decoder = Decoder(model, max_batch_size=1, max_length=256, tokenizer=tokenizer)
    ((ids, _),) = run_to_end(decoder, [Request(prompt, 40)])
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert len(text) > 6
    stop = text[3:5]
    outputs = []
    decoder.add(Request(prompt, 40, stop_strings=["never there", stop]))
    while decoder.active:
        outputs += decoder.step()
    last = outputs[-1]
    assert (last.finish_reason, last.stop_string) == (STOP, stop)
    answer = tokenizer.decode([o.token_id for o in outputs], skip_special_tokens=True)
    assert answer[:last.text_end] == text[:text.index(stop)]
    assert len(outputs) < len(ids)
    with pytest.raises(ValueError, match="stop_strings need the decoder's tokenizer"):
        Decoder(model, max_batch_size=1, max_length=256).add(Request(prompt, 4, stop_strings=["x"]))


# ---------------------------------------------------------------- sampling


def test_seeded_rows_sample_the_same_whatever_else_is_in_the_batch(chatglm):
    prompts = chatglm_prompts(chatglm.config)
    sampling = Sampling(temperature=0.9, top_p=0.8, seed=11)

    def run(batch):
        decoder = Decoder(chatglm, max_batch_size=len(batch), max_length=64)
        return run_to_end(decoder, batch)

    together = run([Request(prompts[0], 10, sampling), Request(prompts[1], 10, Sampling(temperature=1.0, seed=5)),
                    Request(prompts[2], 10)])
    assert together[0] == run([Request(prompts[0], 10, sampling)])[0]
    assert together[2][0] == alone(chatglm, prompts[2], 10)  # a greedy row next to sampled ones
    other_seed = run([Request(prompts[0], 10, Sampling(temperature=0.9, top_p=0.8, seed=12))])[0]
    assert other_seed != together[0]
    # a top_p that keeps only the most probable token is greedy
    narrow = run([Request(prompts[0], 10, Sampling(temperature=0.9, top_p=1e-6, seed=1))])[0]
    assert narrow[0] == alone(chatglm, prompts[0], 10)


@pytest.mark.parametrize("temperature", [1e-40, 1e-300, 5e-324, 1e-6])
def test_a_tiny_temperature_draws_the_most_probable_token_without_overflow(temperature):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g) * 30  # gaps far above any of these temperatures
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        probs = top_p_probabilities(logits.to(dtype), temperature, 0.7)
        assert torch.isfinite(probs).all() and probs.dtype == torch.float32
        assert torch.equal(probs.argmax(-1), logits.to(dtype).float().argmax(-1))
        assert torch.equal(probs.max(-1).values, torch.ones(3))  # all the mass on the most probable token
    samplings = [Sampling(temperature=temperature, seed=i) for i in range(3)]
    tokens = choose_tokens(logits, samplings, [s.generator("cpu") for s in samplings], False)
    assert tokens.tolist() == logits.argmax(-1).tolist()
    # tokens tied for the top share the draw, as the limit of a shrinking temperature does
    tied = torch.tensor([[1.0, 5.0, 5.0, -2.0]])
    assert top_p_probabilities(tied, 1e-40, 1.0).tolist() == [[0.0, 0.5, 0.5, 0.0]]


def test_a_row_whose_draw_fails_fails_alone(chatglm, monkeypatch):
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(1))
    logits[1, 4] = float("nan")
    samplings = [Sampling(temperature=0.8, seed=1), Sampling(temperature=0.8, seed=2), Sampling()]
    failures: dict[int, str] = {}
    tokens = choose_tokens(logits, samplings, [s.generator("cpu") for s in samplings], False, failures)
    assert list(failures) == [1] and "not finite" in failures[1]
    assert tokens[2] == logits[2].argmax()
    with pytest.raises(ValueError, match="not finite"):  # without a record of failures, the error propagates
        choose_tokens(logits, samplings, [s.generator("cpu") for s in samplings], False)
    # in the decode loop: the poisoned row ends with finish reason "error" at once, the others as they would alone
    real = decode_loop.draw_tokens

    def poisoned(logits, samplings, *args):
        logits = logits.clone()
        for i, sampling in enumerate(samplings):
            if sampling.temperature == 0.5:
                logits[i, 0] = float("nan")
        return real(logits, samplings, *args)

    monkeypatch.setattr(decode_loop, "draw_tokens", poisoned)
    prompts = chatglm_prompts(chatglm.config)
    decoder = Decoder(chatglm, max_batch_size=3, max_length=64)
    handles = [decoder.add(Request(prompts[0], 8)), decoder.add(Request(prompts[1], 8, Sampling(temperature=0.5))),
               decoder.add(Request(prompts[2], 8, Sampling(temperature=0.9, seed=4)))]
    got: dict[int, list] = {h: [] for h in handles}
    while decoder.active:
        for out in decoder.step():
            got[out.handle].append(out)
    bad = got[handles[1]]
    assert len(bad) == 1 and bad[0].finish_reason == ERROR and "sampling failed" in bad[0].error
    assert [o.token_id for o in got[handles[0]]] == alone(chatglm, prompts[0], 8)
    sampled = run_to_end(Decoder(chatglm, max_batch_size=1, max_length=64),
                         [Request(prompts[2], 8, Sampling(temperature=0.9, seed=4))])[0][0]
    assert [o.token_id for o in got[handles[2]]] == sampled
    with pytest.raises(RuntimeError, match="request 1: sampling failed"):
        run_to_end(Decoder(chatglm, max_batch_size=2, max_length=64),
                   [Request(prompts[0], 4), Request(prompts[1], 4, Sampling(temperature=0.5))])


def test_generate_ids_sampling_repeats_under_the_global_seed(chatglm):
    cfg = chatglm.config
    prompts = chatglm_prompts(cfg)
    settings = GenerationSettings(max_new_tokens=8, do_sample=True, top_p=0.7, temperature=0.95)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(generate_ids(chatglm, prompts, settings, pad_id=cfg.pad_token_id, stop_ids=[cfg.eos_token_id]))
    assert runs[0] == runs[1]
    torch.manual_seed(8)
    assert generate_ids(chatglm, prompts, settings, pad_id=cfg.pad_token_id, stop_ids=[cfg.eos_token_id]) != runs[0]


def test_beam_search_still_runs_through_generate(chatglm):
    cfg = chatglm.config
    prompts = chatglm_prompts(cfg)
    settings = GenerationSettings(max_new_tokens=5, num_beams=2)
    got = generate_ids(chatglm, prompts, settings, pad_id=cfg.pad_token_id, stop_ids=[cfg.eos_token_id])
    ids, mask = left_pad(prompts, cfg.pad_token_id)
    out = chatglm.generate(ids, attention_mask=mask, max_new_tokens=5, num_beams=2, do_sample=False,
                           eos_token_id=[cfg.eos_token_id], pad_token_id=cfg.pad_token_id)
    assert got == [strip_generated(r[ids.shape[1]:].tolist(), [cfg.eos_token_id], cfg.pad_token_id) for r in out]


# ---------------------------------------------------------------- streaming


def test_closing_a_stream_stops_at_once(chatglm):
    cfg = chatglm.config
    (prompt,) = chatglm_prompts(cfg, (6,))
    calls = []
    hook = chatglm.register_forward_hook(lambda *_: calls.append(1))
    try:
        tokens = stream_ids(chatglm, prompt, GenerationSettings(max_new_tokens=50), pad_id=cfg.pad_token_id,
                            stop_ids=[cfg.eos_token_id])
        first = [next(tokens), next(tokens)]
        tokens.close()
        assert len(calls) == 2  # the prefill and one decode step, nothing after the close
    finally:
        hook.remove()
    assert first == alone(chatglm, prompt, 2)


# ---------------------------------------------------------------- the slot cache


def test_the_cache_holds_tokens_only_and_grows_keeping_them(chatglm):
    cfg = chatglm.config
    prompts = chatglm_prompts(cfg, (3, 8))
    decoder = Decoder(chatglm, max_batch_size=2, max_length=64, capacity=4)
    cache = decoder.cache
    assert cache.room == cfg.pre_seq_len
    for p in prompts:
        decoder.add(Request(p, 20))
    decoder.step()
    assert cache.host_lengths == [len(p) for p in prompts] and cache.lengths.tolist() == cache.host_lengths
    assert cache.capacity >= 10  # grew from 4 for the longer prompt
    decoder.step()
    assert cache.host_lengths == [len(p) + 1 for p in prompts]  # the prefix is never counted as tokens
    # the stored keys of the shorter row are its own tokens' (no pads): a fresh prefill of it alone agrees
    solo = Decoder(chatglm, max_batch_size=1, max_length=64)
    solo.add(Request(prompts[0], 20))
    solo.step()
    solo.step()
    n = cache.room + cache.host_lengths[0]
    for layer in range(cfg.num_layers):
        torch.testing.assert_close(cache.keys[layer][0, :, cache.room:n], solo.cache.keys[layer][0, :, cache.room:n],
                                   rtol=1e-5, atol=1e-6)


def test_decoder_and_cache_errors(chatglm):
    cfg = chatglm.config
    (prompt,) = chatglm_prompts(cfg, (4,))
    decoder = Decoder(chatglm, max_batch_size=1, max_length=20)
    with pytest.raises(ValueError, match="an empty prompt"):
        decoder.add(Request([], 4))
    with pytest.raises(ValueError, match="max_new_tokens=0: expected a positive integer"):
        decoder.add(Request(prompt, 0))
    with pytest.raises(ValueError, match="6 prompt tokens \\+ max_new_tokens=15 exceed the model's 20 positions"):
        decoder.add(Request(prompt, 15))
    with pytest.raises(ValueError, match="top_p=1.5: expected a number in \\(0, 1\\]"):
        decoder.add(Request(prompt, 4, Sampling(temperature=1.0, top_p=1.5)))
    with pytest.raises(ValueError, match="prefix index 1: expected 0 .. 0"):
        decoder.add(Request(prompt, 4, prefix=1))
    decoder.add(Request(prompt, 4))
    with pytest.raises(DecoderFull, match="all 1 slots are taken"):
        decoder.add(Request(prompt, 4))
    assert decoder.cancel(12345) is False
    cache = SlotCache(num_layers=1, slots=2, num_key_value_heads=1, head_dim=4, capacity=4, prefix_room=2)
    with pytest.raises(ValueError, match="a prefix of 3 columns in a cache with room for 2"):
        cache.begin_decode(3)
    with pytest.raises(RuntimeError, match="outside a step"):
        cache.update(0, torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4))
    with pytest.raises(ValueError, match="rows 1..2 of a cache with 2 slots"):
        cache.begin_prefill(1, torch.ones(2, 3))


def test_prefix_table_gathers_rows_and_drops_an_all_visible_mask():
    keys = [torch.arange(3.0)[:, None, None, None].expand(3, 1, 2, 1)]
    mask = torch.tensor([[True, True], [True, False], [False, False]])
    table = PrefixTable(PrefixKV(keys, keys, mask))
    assert table.length == 2 and table.choices == 3
    got = table.gather([2, 0])
    assert got.keys[0][:, 0, 0, 0].tolist() == [2.0, 0.0]
    assert got.mask.tolist() == [[False, False], [True, True]]
    assert table.gather([0, 0]).mask is None
    one = PrefixTable(PrefixKV([keys[0][:1]], [keys[0][:1]]))
    assert one.gather([0, 0, 0]).keys[0].shape[0] == 3
    assert PrefixTable(None).gather([0]) is None and PrefixTable(None).length == 0


# ---------------------------------------------------------------- torch.compile of the step, and its fallback


def test_compiled_step_gives_the_eager_ids_for_every_batch_and_length(chatglm):
    """The traced step (dynamo with its eager backend: the tracing and the guards, without a C++ compile) serves
    batches that shrink as rows stop and every length, without recompiling."""
    import torch._dynamo

    cfg = chatglm.config
    prompts = chatglm_prompts(cfg)
    stop = alone(chatglm, prompts[0], 10)[4]
    requests = [Request(p, 10, stop_token_ids=[stop]) for p in prompts]
    eager = run_to_end(Decoder(chatglm, max_batch_size=3, max_length=64), requests)
    torch._dynamo.reset()
    counts = torch._dynamo.utils.counters
    counts.clear()
    compiled = Decoder(chatglm, max_batch_size=3, max_length=64, compile=True, compile_options={"backend": "eager"})
    assert run_to_end(compiled, requests) == eager
    assert compiled._compiled is not None
    again = Decoder(chatglm, max_batch_size=3, max_length=64, compile=True, compile_options={"backend": "eager"})
    assert run_to_end(again, requests) == eager  # a new decoder reuses the compiled step
    assert counts["stats"]["unique_graphs"] == 1
    assert not counts["graph_break"]


def test_evaluation_compiles_its_decode_step_once_for_all_its_batches(monkeypatch):
    """Batches of different sizes and lengths (and rows leaving mid-batch) reuse one decoder and its compiled
    step: one graph for batches of several rows and one for a single row, however many batches."""
    import torch._dynamo

    from ptuning.build import load
    from ptuning.config import ModelConfig
    from ptuning.evaluation.run import predict
    from ptuning.models import Conversation

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": "eager"}))
    loaded = load(ModelConfig(pre_seq_len=4))
    model, template = loaded.model.eval(), loaded.template
    queries = ["类型#裙", "类型#裙*颜色#黑色*风格#简约", "你好", "类型#上衣*材质#棉", "好", "类型#裤*版型#宽松*长度#九分裤"]
    examples = [{"prompt": q, "input_ids": template.prompt(Conversation(query=q), 64).ids, "reference": "x"}
                for q in queries]
    torch._dynamo.reset()
    counts = torch._dynamo.utils.counters
    counts.clear()
    settings = GenerationSettings(max_new_tokens=6, compile=True)
    _, compiled = predict(model, template, None, settings, batch_size=2, progress=False, examples=examples[:5])
    _, eager = predict(model, template, None, GenerationSettings(max_new_tokens=6), batch_size=2,
                       progress=False, examples=examples[:5])
    assert [r["predict"] for r in compiled] == [r["predict"] for r in eager]
    assert counts["stats"]["unique_graphs"] <= 2, dict(counts["stats"])
    torch._dynamo.reset()


def test_cuda_graph_compile_modes_are_refused(chatglm):
    for options in ({"mode": "reduce-overhead"}, {"mode": "max-autotune"}, {"options": {"triton.cudagraphs": True}}):
        with pytest.raises(ValueError, match="captures CUDA graphs, which the decode step does not support"):
            Decoder(chatglm, max_batch_size=2, max_length=32, compile=True, compile_options=options)
    Decoder(chatglm, max_batch_size=2, max_length=32, compile=True, compile_options={"mode": "max-autotune-no-cudagraphs"})


def test_a_failing_compile_falls_back_to_eager_with_a_warning(chatglm):
    import torch._dynamo

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler here")

    torch._dynamo.reset()
    prompts = chatglm_prompts(chatglm.config)
    requests = [Request(p, 6) for p in prompts]
    eager = run_to_end(Decoder(chatglm, max_batch_size=3, max_length=64), requests)
    decoder = Decoder(chatglm, max_batch_size=3, max_length=64, compile=True,
                      compile_options={"backend": broken_backend})
    with pytest.warns(RuntimeWarning, match="the compiled decode step failed, decoding eagerly from now on"):
        assert run_to_end(decoder, requests) == eager
    assert decoder._compiled is None
    torch._dynamo.reset()


# ---------------------------------------------------------------- pre-packed linears


@pytest.mark.skipif(not packing_available(torch.bfloat16), reason="oneDNN bfloat16 linears not available")
def test_packed_linears_give_the_same_ids_and_restore_the_weights_bit_for_bit(chatglm):
    cfg = chatglm.config
    prompts = chatglm_prompts(cfg)
    settings = GenerationSettings(max_new_tokens=8)
    for dtype in (torch.bfloat16, torch.float32):
        model = cast_backbone(copy.deepcopy(chatglm), dtype).eval()
        model.requires_grad_(False)
        dense = generate_ids(model, prompts, settings, pad_id=cfg.pad_token_id, stop_ids=[cfg.eos_token_id])
        before = {k: (v.clone(), v.stride()) for k, v in model.state_dict().items()}
        with packed_linears(model, rows=1) as count:
            assert count == (4 * cfg.num_layers + 1 if dtype == torch.bfloat16 else 0)  # float32: MKL at one row
        with packed_linears(model, rows=3) as count:
            assert count == 4 * cfg.num_layers + 1  # every block linear and the (column-major) lm_head
            assert model.transformer.layers[0].mlp.dense_h_to_4h.weight.numel() == 0  # no second copy
            packed = generate_ids(model, prompts, settings, pad_id=cfg.pad_token_id, stop_ids=[cfg.eos_token_id])
        assert packed == dense
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key][0]) and value.stride() == before[key][1], key


def test_packed_linears_refuse_training_and_leave_tied_weights_alone():
    model = hf_model("llama", 0)
    with pytest.raises(RuntimeError, match="the model is in training mode"):
        with packed_linears(model.train()):
            pass
    model.eval().requires_grad_(False)
    model.lm_head.weight = model.model.embed_tokens.weight  # tied
    with packed_linears(model, rows=2) as count:
        assert count == 7 * model.config.num_hidden_layers  # q, k, v, o, gate, up, down: not the tied lm_head
        assert model.lm_head.weight.numel() > 0


class _ReportsCuda(torch.nn.Parameter):
    """A CPU parameter that says it is on a GPU (what ``store_lm_head_column_major`` reads to decide)."""

    @property
    def device(self):
        return torch.device("cuda", 0)


def test_the_output_layer_is_stored_column_major_on_a_cpu_only(chatglm):
    on_cpu = copy.deepcopy(chatglm)
    on_cpu.lm_head.weight.data = on_cpu.lm_head.weight.data.contiguous()
    before = on_cpu.lm_head.weight.detach().clone()
    on_cpu.store_lm_head_column_major()
    assert not on_cpu.lm_head.weight.is_contiguous() and torch.equal(on_cpu.lm_head.weight, before)
    on_gpu = copy.deepcopy(chatglm)
    on_gpu.lm_head.weight = _ReportsCuda(on_gpu.lm_head.weight.data.contiguous(), requires_grad=False)
    Decoder(on_gpu, max_batch_size=1, max_length=16)  # what evaluation, chat and the server construct
    on_gpu.store_lm_head_column_major()  # what generate() calls, also in training's evaluation
    assert on_gpu.lm_head.weight.is_contiguous()  # no transposed copy of the largest weight on a GPU


@pytest.mark.parametrize("family", ["chatglm", "llama"])
def test_a_bfloat16_model_keeps_a_float32_cache_on_a_cpu(family, chatglm):
    model = copy.deepcopy(chatglm) if family == "chatglm" else hf_model("llama", 3)
    cast_backbone(model, torch.bfloat16)
    assert default_cache_dtype(model, "cpu") == torch.float32
    assert default_cache_dtype(model, "cuda") == torch.bfloat16
    prompts = chatglm_prompts(model.config) if family == "chatglm" else hf_prompts()
    pad, stop = (model.config.pad_token_id, [model.config.eos_token_id]) if family == "chatglm" else (0, [2])
    want = reference_ids(model, prompts, pad_id=pad, stop_ids=stop, max_new_tokens=8)
    got = generate_ids(model, prompts, GenerationSettings(max_new_tokens=8), pad_id=pad, stop_ids=stop)
    assert got == want  # bfloat16 everywhere but the attention over the cache: the same greedy answers here
    decoder = Decoder(model, max_batch_size=2, max_length=32)
    decoder.add(Request(prompts[0], 4))  # the cache is allocated for what the request needs
    assert decoder.cache.keys[0].dtype == torch.float32


@pytest.mark.parametrize("version", [2, 3])
def test_chatglm2_and_3_greedy_ids_equal_generate_with_their_templates(version):
    """ChatGLM2-6B / ChatGLM3-6B (transformers' GlmForCausalLM with the generic prefix): prompts of their own
    templates, a prefix, rows of different lengths."""
    from ptuning.build import load
    from ptuning.config import ModelConfig
    from ptuning.models import Conversation

    loaded = load(ModelConfig(path=f"builtin:tiny-chatglm{version}", pre_seq_len=4))
    model, template = loaded.model.eval(), loaded.template
    with torch.no_grad():
        model.prefix_encoder.embedding.weight.mul_(0.3)
    prompts = [template.prompt(Conversation(query=q), 64).ids for q in ("类型#裙*颜色#黑色", "你好", "写一段广告词")]
    pad, stops = template.pad_token_id, template.stop_token_ids
    want = reference_ids(model, prompts, pad_id=pad, stop_ids=stops, max_new_tokens=10)
    assert generate_ids(model, prompts, GenerationSettings(max_new_tokens=10), pad_id=pad, stop_ids=stops) == want
    assert len({tuple(r) for r in want}) == len(want)


def test_ids_beyond_the_vocab_limit_are_never_chosen(chatglm):
    prompts = chatglm_prompts(chatglm.config)
    requests = [Request(p, 12, Sampling(temperature=t, seed=1)) for p, t in zip(prompts, (0.0, 1.5, 3.0), strict=True)]
    free = run_to_end(Decoder(chatglm, max_batch_size=3, max_length=64), requests)
    limit = 500
    assert max(t for ids, _ in free for t in ids) >= limit  # the limit has something to change
    limited = run_to_end(Decoder(chatglm, max_batch_size=3, max_length=64, vocab_limit=limit), requests)
    assert max(t for ids, _ in limited for t in ids) < limit


def test_the_cache_is_sized_from_what_requests_need_and_checked_before_allocating(chatglm, monkeypatch):
    from ptuning.generation import CacheMemoryError, memory
    from ptuning.generation import cache as cache_module

    allocated = []
    real = cache_module._allocate
    monkeypatch.setattr(cache_module, "_allocate", lambda *a: allocated.append(a[0]) or real(*a))
    # a model of a million positions: nothing is allocated before a request says what it needs
    decoder = Decoder(chatglm, max_batch_size=4, max_length=1 << 20)
    assert allocated == [] and decoder.cache.capacity == 0
    (prompt,) = chatglm_prompts(chatglm.config, (5,))
    decoder.add(Request(prompt, 20))  # 7 + 20 tokens: a power of two that holds them
    assert decoder.cache.capacity == 32 and {shape[2] for shape in allocated} == {decoder.cache.room + 32}
    # what does not fit in the free memory is refused before anything is allocated, and the cache stays
    per_row = decoder.cache.shape.bytes(1, decoder.cache.room + 4096)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2 * per_row)
    allocated.clear()
    with pytest.raises(CacheMemoryError, match=r"a generation cache of 4 rows x \d+ columns .* needs .* but .* of "
                                               r"memory is free on cpu"):
        decoder.add(Request(prompt, 4000))
    assert allocated == [] and decoder.cache.capacity == 32 and decoder.active == 1
    assert len(run_to_end(decoder, [])) == 0 and decoder.step()  # the admitted row goes on


@pytest.mark.parametrize("builtin", ["tiny-chatglm", "tiny-chatglm2"])
def test_ids_without_a_tokenizer_piece_are_never_chosen_by_evaluation_chat_or_beam_search(builtin, monkeypatch):
    """The tiny checkpoints pad their output layer as the real ones do (1000 rows for 998 pieces; 1024 for
    1005): with those rows' logits pushed far up, unrestricted decoding would take them at every step."""
    import ptuning.evaluation.generate as generate_module
    import ptuning.evaluation.run as run_module
    from ptuning.build import load
    from ptuning.chat import ChatSession
    from ptuning.config import ModelConfig
    from ptuning.models import Conversation

    loaded = load(ModelConfig(path=f"builtin:{builtin}"), pre_seq_len=None, init=False)
    model, template = loaded.model.eval(), loaded.template
    pieces = len(template.tokenizer)
    head = model.get_output_embeddings()
    assert head.weight.shape[0] > pieces
    bump = torch.zeros(head.weight.shape[0])
    bump[pieces:] = 1e4
    head.register_forward_hook(lambda module, args, out: out + bump)
    prompts = [template.prompt(Conversation(query=q), 64).ids for q in ("类型#裙", "你好")]
    settings = GenerationSettings(max_new_tokens=5)
    free = generate_ids(model, prompts, settings, pad_id=template.pad_token_id, stop_ids=[])
    assert all(min(ids) >= pieces for ids in free)  # what the padded rows would do unrestricted
    beams = generate_ids(model, prompts, GenerationSettings(max_new_tokens=5, num_beams=2),
                         pad_id=template.pad_token_id, stop_ids=template.stop_token_ids, vocab_limit=pieces)
    assert all(max(ids, default=0) < pieces for ids in beams) and any(beams)
    # evaluation
    seen = []
    real_generate = run_module.generate_ids
    monkeypatch.setattr(run_module, "generate_ids", lambda *a, **kw: seen.extend(real_generate(*a, **kw)) or seen[-2:])
    examples = [{"prompt": "p", "input_ids": p, "reference": "r"} for p in prompts]
    run_module.predict(model, template, None, settings, batch_size=2, progress=False, examples=examples)
    assert len(seen) == 2 and all(ids and max(ids) < pieces for ids in seen)
    # chat
    streamed = []
    real_stream = generate_module.stream_ids
    monkeypatch.setattr(generate_module, "stream_ids",
                        lambda *a, **kw: (streamed.append(t) or t for t in real_stream(*a, **kw)))
    session = ChatSession(model, template, GenerationSettings(max_new_tokens=5), loaded.max_positions)
    _, ids, _, _ = session.prepare("你好")
    "".join(session.reply("你好", ids))
    assert len(streamed) == 5 and max(streamed) < pieces
