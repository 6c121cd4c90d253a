"""``python -m ptuning.serve`` on the tiny model with three prefixes, driven with the official ``openai`` client
over loopback: models, chat, completions, streaming, ``n``, stop strings; greedy answers equal to
``evaluate.py``'s predictions; mixed-prefix batching equal to serving alone; 64 streaming clients; bad input;
disconnects; the API key; the chat page in headless Chromium; SIGTERM. Then ChatGLM2-6B's and ChatGLM3-6B's tiny
models (another family): equal to ``evaluate.py``, chat with history, mixed-prefix batches."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from .common import ROOT
from .serving import Server, save_random_prefix
from .test_evaluate import compose_evaluate, read_jsonl, reset_accelerate

KEY = "test-key-123"
BASE = "tiny-chatglm"
DEV = ROOT / "data" / "adgen_sample" / "dev.json"
QUERIES = [json.loads(line)["content"] for line in DEV.read_text(encoding="utf-8").splitlines()[:8]]
ARTIFACTS = ROOT / "outputs" / "test-artifacts"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Three random prefixes of different lengths: ours, ours with projection, the original format."""
    base = tmp_path_factory.mktemp("serve")
    return {
        "short": save_random_prefix(base / "short", 4, seed=1),
        "proj": save_random_prefix(base / "proj", 8, seed=2, projection=True, scale=10.0),
        "long": save_random_prefix(base / "long", 16, seed=3, original_format=True),
    }


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    prefixes = [f"--prefix={name}={path}" for name, path in checkpoints.items()]
    srv = Server(*prefixes, "--api-key", KEY, "--max-batch-size", "16",
                 log=tmp_path_factory.mktemp("log") / "server.log")
    yield srv
    assert srv.stop() == 0, srv.errors()


@pytest.fixture(scope="module")
def client(server):
    return server.client(KEY)


def health(server) -> dict:
    return httpx.get(f"{server.url}/health", timeout=10).json()


def wait_idle(server, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        state = health(server)
        if (state["active"] == 0 and state["waiting"] == 0) or time.monotonic() > deadline:
            return state
        time.sleep(0.05)


def greedy_chat(client, model: str, query: str, max_tokens: int = 24, **extra) -> str:
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": query}],
                                           max_tokens=max_tokens, temperature=0, **extra)
    return reply.choices[0].message.content


def test_models_are_listed_and_the_key_is_required(server, client):
    assert [m.id for m in client.models.list().data] == [BASE, "short", "proj", "long"]
    assert client.models.retrieve("proj").id == "proj"
    with pytest.raises(openai.AuthenticationError) as err:
        server.client("wrong-key").models.list()
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    assert err.value.body["message"] == "incorrect API key"
    bare = httpx.post(f"{server.url}/v1/chat/completions", json={"model": BASE, "messages": []})
    assert bare.status_code == 401
    assert bare.json()["error"]["message"].startswith("no API key given")
    assert health(server)["status"] == "ok"  # health needs no key
    # the chat page asks for the key as its password
    assert httpx.get(f"{server.url}/ui/config").status_code == 401
    assert httpx.post(f"{server.url}/ui/login", data={"username": "me", "password": "nope"}).status_code == 400
    login = httpx.post(f"{server.url}/ui/login", data={"username": "me", "password": KEY})
    assert login.status_code == 200 and httpx.get(f"{server.url}/ui/config", cookies=login.cookies).status_code == 200


@pytest.mark.slow
def test_greedy_answers_equal_evaluate_predictions_for_each_prefix(server, client, checkpoints, tmp_path):
    from ptuning.evaluation.run import run

    rows = 6
    for name, checkpoint in checkpoints.items():
        reset_accelerate()
        run(compose_evaluate([f"prefix_checkpoint={checkpoint}", f"output_dir={tmp_path / name}",
                              f"data.cache_dir={tmp_path / 'cache'}", f"data.max_eval_samples={rows}",
                              "generation.max_new_tokens=24", "batch_size=4"]))
        predictions = [r["predict"] for r in read_jsonl(tmp_path / name / "generated_predictions.jsonl")]
        served = [client.completions.create(model=name, prompt=q, max_tokens=24, temperature=0).choices[0].text
                  for q in QUERIES[:rows]]
        assert served == predictions, name
        # a chat turn without history is the same prompt
        assert [greedy_chat(client, name, q) for q in QUERIES[:rows]] == predictions, name
    # the prefixes matter: each answers differently from the others and from the base model
    answers = {name: tuple(greedy_chat(client, name, q) for q in QUERIES[:rows]) for name in [*checkpoints, BASE]}
    assert len(set(answers.values())) == 4, answers


def test_streaming_chunks_add_up_to_the_answer(client):
    messages = [{"role": "user", "content": QUERIES[1]}, {"role": "assistant", "content": "这条裙子很好看。"},
                {"role": "user", "content": "再写一段"}]
    whole = client.chat.completions.create(model="proj", messages=messages, max_tokens=40, temperature=0)
    chunks = list(client.chat.completions.create(model="proj", messages=messages, max_tokens=40, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content != ""
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    pieces = list(client.completions.create(model="short", prompt=QUERIES[2], max_tokens=30, temperature=0,
                                            stream=True))
    plain = client.completions.create(model="short", prompt=QUERIES[2], max_tokens=30, temperature=0)
    assert "".join(p.choices[0].text for p in pieces) == plain.choices[0].text
    assert pieces[-1].choices[0].finish_reason == plain.choices[0].finish_reason


def test_n_choices_seeds_and_prompt_lists(client):
    def sample(seed):
        reply = client.chat.completions.create(model="long", messages=[{"role": "user", "content": QUERIES[3]}],
                                               max_tokens=16, temperature=1.0, top_p=0.9, n=3, seed=seed)
        return reply, [c.message.content for c in reply.choices]

    first, texts = sample(7)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert sample(7)[1] == texts  # each choice has its own seeded stream
    assert 0 < first.usage.completion_tokens <= 3 * 16
    assert len(set(texts) | set(sample(8)[1])) > 1
    both = client.completions.create(model="short", prompt=QUERIES[:2], n=2, max_tokens=12, temperature=0)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    alone = [client.completions.create(model="short", prompt=q, max_tokens=12, temperature=0) for q in QUERIES[:2]]
    assert [c.text for c in both.choices] == [alone[0].choices[0].text] * 2 + [alone[1].choices[0].text] * 2
    assert both.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)


def test_stop_strings_and_ignore_eos(client):
    answer = greedy_chat(client, BASE, QUERIES[0], 48)
    assert len(answer) >= 6
    stop = answer[3:5]
    cut = client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": QUERIES[0]}],
                                         max_tokens=48, temperature=0, stop=["never there", stop])
    assert cut.choices[0].message.content == answer[: answer.index(stop)].rstrip()
    assert cut.choices[0].finish_reason == "stop"
    long = client.completions.create(model=BASE, prompt=QUERIES[0], max_tokens=60, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert long.choices[0].finish_reason == "length" and long.usage.completion_tokens == 60


def test_mixed_prefix_batch_equals_each_request_alone(server, client):
    requests = [(name, q) for q in QUERIES for name in ("short", "proj", "long")]  # 24, three prefixes
    alone = [greedy_chat(client, name, q) for name, q in requests]
    before = health(server)
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda r: greedy_chat(client, *r), requests))
    after = health(server)
    assert together == alone
    # decoded together: many tokens per step (alone, every step decodes one row)
    steps, tokens = after["steps"] - before["steps"], after["generated_tokens"] - before["generated_tokens"]
    assert tokens / steps > 4, (tokens, steps)
    # the prefixes differ, so an answer that leaked another row's prefix would show
    by_prefix = {name: [a for (n, _), a in zip(requests, alone, strict=True) if n == name]
                 for name in ("short", "proj", "long")}
    assert by_prefix["short"] != by_prefix["proj"] != by_prefix["long"]


BAD = [
    # (path, raw body, status, param, code)
    ("/v1/chat/completions", b'{"model": "short", "messages": [', 400, None, "invalid_json"),
    ("/v1/chat/completions", b'["not", "an", "object"]', 400, None, "invalid_json"),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model",
     "model_not_found"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, 400, "model",
     "missing_required_parameter"),
    ("/v1/chat/completions", {"model": "short", "messages": [{"role": "user", "content": "裙" * 600}]}, 400,
     "messages", "context_length_exceeded"),
    ("/v1/chat/completions", {"model": "short", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 600},
     400, "max_tokens", "context_length_exceeded"),
    ("/v1/completions", {"model": "short", "prompt": "裙" * 600}, 400, "prompt", "context_length_exceeded"),
    ("/v1/chat/completions", {"model": "short", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5},
     400, "max_tokens", "invalid_value"),
    ("/v1/chat/completions", {"model": "short", "messages": [{"role": "user", "content": "hi"}],
                              "max_completion_tokens": 0}, 400, "max_completion_tokens", "invalid_value"),
    ("/v1/chat/completions", {"model": "short", "messages": [{"role": "user", "content": "hi"},
                                                             {"role": "robot", "content": "x"}]},
     400, "messages[1].role", "invalid_value"),
    ("/v1/chat/completions", {"model": "short", "messages": [{"role": "assistant", "content": "hi"}]}, 400,
     "messages[0].role", "invalid_value"),
    ("/v1/chat/completions", {"model": "short", "messages": []}, 400, "messages", "invalid_value"),
    ("/v1/chat/completions", {"model": "short", "messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content", "invalid_type"),
    ("/v1/chat/completions", {"model": "short", "messages": [{"role": "user", "content": "hi"}], "temperature": 3},
     400, "temperature", "invalid_value"),
    ("/v1/chat/completions", {"model": "short", "messages": [{"role": "user", "content": "hi"}], "top_p": 0},
     400, "top_p", "invalid_value"),
    ("/v1/chat/completions", {"model": "short", "messages": [{"role": "user", "content": "hi"}], "n": 0},
     400, "n", "invalid_value"),
    ("/v1/chat/completions", {"model": "short", "messages": [{"role": "user", "content": "hi"}],
                              "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "invalid_value"),
    ("/v1/chat/completions", {"model": "short", "messages": [{"role": "user", "content": "hi"}],
                              "tools": [{"type": "function", "function": {"name": "f"}}]},
     400, "tools", "unsupported_parameter"),
    ("/v1/completions", {"model": "short", "prompt": [1, 2, 3]}, 400, "prompt", "invalid_value"),
    ("/v1/completions", {"model": "short", "prompt": ["a"] * 10, "n": 10}, 400, "n", "invalid_value"),
    ("/v1/completions", {"model": "short"}, 400, "prompt", "missing_required_parameter"),
    ("/v1/nothing-here", {}, 404, None, "not_found"),
    # prompt + max_tokens just over the positions: the prompt fits, so max_tokens is named
    ("/v1/completions", {"model": "short", "prompt": "hi", "max_tokens": 510}, 400, "max_tokens",
     "context_length_exceeded"),
    # fields OpenAI does not define, wherever they are, and fields this server cannot honour
    ("/v1/chat/completions", {"model": "short", "messages": [{"role": "user", "content": "hi"}], "foo": "bar"},
     400, "foo", "unknown_parameter"),
    ("/v1/chat/completions", {"model": "short", "messages": [{"role": "user", "content": "hi", "zzz": 1}]},
     400, "messages[0].zzz", "unknown_parameter"),
    ("/v1/completions", {"model": "short", "prompt": "hi", "max_completion_tokens": 5}, 400,
     "max_completion_tokens", "unknown_parameter"),
    ("/v1/chat/completions", {"model": "short", "messages": [{"role": "user", "content": "hi", "name": "bob"}]},
     400, "messages[0].name", "unsupported_parameter"),
    # ChatGLM-6B's template has no system message: refused, not dropped
    ("/v1/chat/completions", {"model": "short", "messages": [{"role": "system", "content": "be brief"},
                                                             {"role": "user", "content": "hi"}]},
     400, "messages[0].role", "invalid_value"),
    # strict types: no coercion
    ("/v1/chat/completions", {"model": "short", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "10"},
     400, "max_tokens", "invalid_type"),
    ("/v1/chat/completions", {"model": "short", "messages": [{"role": "user", "content": "hi"}], "max_tokens": True},
     400, "max_tokens", "invalid_type"),
    ("/v1/chat/completions", {"model": "short", "messages": [{"role": "user", "content": "hi"}], "n": "2"},
     400, "n", "invalid_type"),
    ("/v1/chat/completions", {"model": "short", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"},
     400, "stream", "invalid_type"),
    ("/v1/chat/completions", {"model": "short", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                              "stream_options": {"include_usage": "x"}},
     400, "stream_options.include_usage", "invalid_type"),
    # no character, no JSON
    ("/v1/completions", b'{"model": "short", "prompt": "\\ud800"}', 400, "prompt", "invalid_value"),
    ("/v1/chat/completions", b'{"model": "short", "messages": [{"role": "user", "content": "a\\udc00"}]}', 400,
     "messages[0].content", "invalid_value"),
    ("/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000, 400, None, "invalid_json"),
    ("/v1/chat/completions", b'{"model": "short", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400,
     None, "invalid_json"),
    ("/v1/chat/completions", b'{"model": "short", "messages": [{"role": "user", "content": "hi"}], '
                             b'"temperature": NaN}', 400, None, "invalid_json"),
]


def test_bad_input_gets_openai_error_bodies_and_spares_the_others(server, client):
    auth = {"Authorization": f"Bearer {KEY}"}
    other = ThreadPoolExecutor(1).submit(
        lambda: client.completions.create(model="long", prompt=QUERIES[4], max_tokens=200, temperature=0,
                                          extra_body={"ignore_eos": True}))
    for path, body, status, param, code in BAD:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        reply = httpx.post(f"{server.url}{path}", content=content, headers=auth, timeout=30)
        assert reply.status_code == status, (path, body, reply.text)
        error = reply.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert (error["param"], error["code"]) == (param, code), (body, error)
        assert error["message"] and "\n" not in error["message"]
        if param:
            assert error["message"].startswith(param.split("[")[0]) or param in error["message"], error
    assert httpx.get(f"{server.url}/v1/chat/completions", headers=auth).status_code == 405
    # the openai client surfaces the same body
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="short", messages=[{"role": "tool", "content": "x"}])
    assert err.value.param == "messages[0].role" and "expected one of" in err.value.message
    # the request running meanwhile was not disturbed
    assert other.result(timeout=120).usage.completion_tokens == 200


def test_a_tiny_temperature_is_greedy_and_spares_the_rest_of_the_batch(client):
    queries = QUERIES[:4]
    alone = [greedy_chat(client, "short", q) for q in queries]

    def tiny(query: str, temperature: float) -> str:
        reply = client.chat.completions.create(model="short", messages=[{"role": "user", "content": query}],
                                               max_tokens=24, temperature=temperature, seed=1)
        return reply.choices[0].message.content

    with ThreadPoolExecutor(8) as pool:  # decoded in the same batches
        greedy = [pool.submit(greedy_chat, client, "short", q) for q in queries]
        tinies = [pool.submit(tiny, q, t) for q, t in zip(queries, [1e-40, 1e-300, 5e-324, 1e-30], strict=True)]
        assert [f.result() for f in greedy] == alone  # the greedy rows next to them are unaffected
        assert [f.result() for f in tinies] == alone  # logits / temperature cannot overflow: as good as greedy


def test_huge_requests_are_refused_early_while_health_answers_at_once(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    latencies, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            began = time.monotonic()
            assert httpx.get(f"{server.url}/health", timeout=60).status_code == 200
            latencies.append(time.monotonic() - began)
            time.sleep(0.02)

    def post(case):
        path, body = case
        raw = json.dumps(body, ensure_ascii=False).encode()
        began = time.monotonic()
        reply = httpx.post(f"{server.url}/v1{path}", content=raw, headers=auth, timeout=120)
        return reply, time.monotonic() - began

    cases = [  # (path, body), status, param, code
        (("/completions", {"model": "short", "prompt": "a" * (20 << 20)}), 413, None, "request_too_large"),
        (("/chat/completions", {"model": "short", "messages": [{"role": "user", "content": "裙" * (1 << 20)}]}),
         400, "messages", "context_length_exceeded"),  # 3 MB: refused by its characters, not tokenized
        (("/completions", {"model": "short", "prompt": ["hi", "裙" * (1 << 20)]}), 400, "prompt[1]",
         "context_length_exceeded"),
        # 40000 characters could be 512 tokens (a token may stand for up to 80): tokenized, then refused
        (("/completions", {"model": "short", "prompt": "裙好" * 20_000}), 400, "prompt", "context_length_exceeded"),
    ]
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(len(cases) * 2) as pool:
            results = list(pool.map(post, [case for case, *_ in cases] * 2))
    finally:
        stop.set()
        watcher.join()
    for (reply, took), (_, status, param, code) in zip(results, cases * 2, strict=True):
        assert reply.status_code == status, reply.text[:300]
        error = reply.json()["error"]
        assert (error["param"], error["code"]) == (param, code), error
        assert took < 20, took
    assert "(--max-request-bytes)" in results[0][0].json()["error"]["message"]
    assert "characters cannot fit" in results[1][0].json()["error"]["message"]
    assert "are in the prompt alone" in results[3][0].json()["error"]["message"]
    assert len(latencies) > 3 and max(latencies) < 2.0, latencies
    # a body sent as text/plain is still read as JSON, and ``user`` (no effect on the answer) is accepted
    reply = httpx.post(f"{server.url}/v1/completions", headers={**auth, "Content-Type": "text/plain"}, timeout=60,
                       content=json.dumps({"model": "short", "prompt": "hi", "max_tokens": 4, "user": "u1"}))
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] <= 4


def test_a_client_that_disconnects_frees_its_slot(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    wait_idle(server)
    body = {"model": "proj", "messages": [{"role": "user", "content": QUERIES[5]}], "max_tokens": 480,
            "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=30) as http, http.stream("POST", f"{server.url}/v1/chat/completions", json=body,
                                                       headers=auth) as stream:
        lines = stream.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: {") for line in got)
        assert health(server)["active"] == 1
    gone = time.monotonic()
    state = wait_idle(server, 5)
    assert state["active"] == 0, state
    freed_after = time.monotonic() - gone
    tokens = state["generated_tokens"]
    time.sleep(0.3)
    assert health(server)["generated_tokens"] == tokens  # nothing decodes for the gone client
    assert freed_after < 2.0
    # the same without streaming: the connection closes while the answer is being generated
    raw = json.dumps({**body, "stream": False}).encode()
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(raw)).encode() +
                     b"\r\n\r\n" + raw)
        deadline = time.monotonic() + 10
        while health(server)["active"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert health(server)["active"] == 1
    assert wait_idle(server, 5)["active"] == 0


@pytest.mark.slow
def test_64_streaming_clients_complete_and_memory_returns(server):
    from openai import AsyncOpenAI

    names = [BASE, "short", "proj", "long"]

    async def one(api, i: int, max_tokens: int) -> tuple[str, str]:
        try:
            stream = await api.chat.completions.create(
                model=names[i % 4], messages=[{"role": "user", "content": QUERIES[i % 8]}], max_tokens=max_tokens,
                temperature=0.0 if i % 2 else 0.9, seed=i, stream=True)
            text, finish = "", None
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    finish = chunk.choices[0].finish_reason or finish
            return finish, text
        except openai.APIError as err:  # a clear error is an acceptable outcome; a hang is not
            return "error", str(err)

    async def load(clients: int, max_tokens) -> list:
        api = AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)
        try:
            return await asyncio.wait_for(
                asyncio.gather(*(one(api, i, max_tokens(i)) for i in range(clients))), timeout=240)
        finally:
            await api.close()

    asyncio.run(load(64, lambda i: 8))  # warm-up: every batch shape and code path once
    wait_idle(server)
    before = server.rss()
    start = time.monotonic()
    results = asyncio.run(load(64, lambda i: 16 + i % 5 * 8))
    elapsed = time.monotonic() - start
    errors = [text for finish, text in results if finish == "error"]
    assert not errors, errors[:3]
    assert all(finish in ("stop", "length") for finish, _ in results)
    assert wait_idle(server)["active"] == 0
    time.sleep(0.5)
    after = server.rss()
    print(f"64 streaming clients in {elapsed:.1f} s; server RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB")
    assert after <= before * 1.05 + 16 * 2**20, (before, after)


def test_command_line_mistakes_are_one_line_errors(checkpoints, tmp_path, capsys):
    from ptuning.serve.cli import main

    wrong = tmp_path / "wrong"
    shutil.copytree(checkpoints["short"], wrong)
    meta = json.loads((wrong / "prefix_config.json").read_text())
    (wrong / "prefix_config.json").write_text(json.dumps({**meta, "num_layers": 3}))
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt"  # the original format's file, damaged
    corrupt.mkdir()
    (corrupt / "pytorch_model.bin").write_bytes(b"this is not a checkpoint" * 40)
    foreign = tmp_path / "foreign"  # a prefix of another family
    shutil.copytree(checkpoints["short"], foreign)
    (foreign / "prefix_config.json").write_text(json.dumps({**meta, "family": "hf", "base_model": "builtin:tiny-glm4"}))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = {
            ("--prefix", "adgen"): "--prefix adgen: expected NAME=CHECKPOINT",
            ("--prefix", "a=/no/such/run"): "--prefix a=/no/such/run: no such folder",
            ("--prefix", f"a={checkpoints['short']}", "--prefix", f"a={checkpoints['long']}"): "the name 'a' is given twice",
            ("--prefix", f"{BASE}={checkpoints['short']}"): f"'{BASE}' is the base model's name",
            ("--prefix", f"x={empty}"): f"--prefix x: {empty}: no prefix.safetensors (ours),",
            ("--prefix", f"x={wrong}"): "--prefix x: " + str(wrong) + ": the prefix was trained with num_layers=3 "
                                        "but the model has num_layers=4",
            ("--max-batch-size", "0"): "--max-batch-size=0: expected a positive integer",
            ("--model-path", "/no/such/model"): "--model-path=/no/such/model: no such folder",
            ("--port", str(port)): f"--host=127.0.0.1 --port={port}: cannot listen there (Address already in use)",
            ("--max-request-bytes", "0"): "--max-request-bytes=0: expected a positive integer",
            ("--prefix", f"x={corrupt}"): f"--prefix x: {corrupt / 'pytorch_model.bin'}: cannot read weights (not a "
                                          "readable PyTorch checkpoint: ",
            ("--prefix", f"x={foreign}"): f"--prefix x={foreign}: a prefix of a transformers decoder model "
                                          "(builtin:tiny-glm4); the model is a ChatGLM-6B model",
        }
        for args, message in cases.items():
            assert main(list(args) if "--port" in args else [*args, "--port", "0"]) == 2, args
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (args, err)
            assert "mmap" not in err[0]
    # a prefix trained on another backbone of the same shape loads, with a warning saying so
    from ptuning.serve.cli import load, parse_args, parse_prefixes

    other = tmp_path / "other"
    shutil.copytree(checkpoints["short"], other)
    (other / "prefix_config.json").write_text(json.dumps({**meta, "base_config_fingerprint": "0123456789abcdef"}))
    loaded = load(parse_args(["--prefix", f"x={other}"]), parse_prefixes([f"x={other}"]))
    assert list(loaded.prefixes) == ["x"]
    warning = capsys.readouterr().err.strip()
    assert warning.startswith(f"warning: --prefix x: {other} was trained on builtin:tiny-chatglm (config "
                              "fingerprint 0123456789abcdef"), warning
    # the model it was trained on, named as builtin:tiny-chatglm or by its folder (any path): no warning
    from ptuning.config import BUILTIN_MODEL

    spec = f"x={checkpoints['short']}"
    for path in ("builtin:tiny-chatglm", str(BUILTIN_MODEL), os.path.relpath(BUILTIN_MODEL),
                 str(BUILTIN_MODEL.parent / ".." / "data" / BUILTIN_MODEL.name)):
        load(parse_args(["--model-path", path, "--prefix", spec]), parse_prefixes([spec]))
        assert capsys.readouterr().err.strip() == "", path
    # ... but another model of the same shapes (other weights) is still told apart
    retrained = tmp_path / "retrained"
    shutil.copytree(checkpoints["short"], retrained)
    (retrained / "prefix_config.json").write_text(json.dumps({**meta, "base_weights_sha256": "0" * 16}))
    spec = f"x={retrained}"
    load(parse_args(["--model-path", os.path.relpath(BUILTIN_MODEL), "--prefix", spec]), parse_prefixes([spec]))
    warning = capsys.readouterr().err.strip()
    assert warning.startswith(f"warning: --prefix x: {retrained} was trained on builtin:tiny-chatglm (config "
                              f"fingerprint {meta['base_config_fingerprint']}, weights 0000000000000000) but the "
                              "model is builtin:tiny-chatglm (config fingerprint "), warning


def test_the_serving_docs_list_every_option_and_endpoint(capsys):
    import re

    from ptuning.serve.cli import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    flags = set(re.findall(r"(--[a-z][a-z-]+)", capsys.readouterr().out)) - {"--help"}
    section = (ROOT / "docs" / "serving.md").read_text(encoding="utf-8")
    assert len(flags) > 10 and flags <= set(re.findall(r"`(--[a-z-]+)", section)), flags
    for endpoint in ("GET /v1/models", "POST /v1/chat/completions", "POST /v1/completions", "GET /health", "/ui/"):
        assert endpoint in section, endpoint


# ---- the chat page and shutdown: a second server without a key, the page on ----


@pytest.fixture(scope="module")
def web_server(checkpoints, tmp_path_factory):
    srv = Server(f"--prefix=short={checkpoints['short']}", f"--prefix=long={checkpoints['long']}",
                 "--max-batch-size", "4", "--shutdown-timeout", "5",
                 log=tmp_path_factory.mktemp("log") / "web.log")
    yield srv
    srv.stop()


def chromium():
    """A headless Chromium driven by selenium (Debian's ``chromium`` and ``chromium-driver``)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service as DriverService

    browser, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not browser or not driver:
        if os.environ.get("PTUNING_REQUIRE_BROWSER"):
            pytest.fail("chromium and chromedriver are required: apt-get install -y chromium chromium-driver")
        pytest.skip("no chromium / chromedriver on this machine (apt-get install -y chromium chromium-driver)")
    import tempfile

    options = Options()
    options.binary_location = browser
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}", "--window-size=1100,1000", "--lang=en-US"):
        options.add_argument(flag)
    return webdriver.Chrome(service=DriverService(executable_path=driver), options=options), profile


@pytest.mark.slow
def test_chat_page_in_a_browser_streams_answers_with_history(web_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from ptuning.serve.web import IDS

    api = web_server.client()
    driver, profile = chromium()
    try:
        driver.get(f"{web_server.url}/")  # redirects to the page
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, f"#{IDS['message']} textarea"))
        assert "/ui" in driver.current_url
        # greedy decoding, so the page's answers can be compared with the API's
        temperature = driver.find_element(By.CSS_SELECTOR, "#temperature input[type=number]")
        temperature.send_keys(Keys.CONTROL, "a")
        temperature.send_keys("0", Keys.TAB)
        # watch the answer grow: record every text the last bot message shows
        driver.execute_script("""
            window.seen = [];
            new MutationObserver(() => {
                const bots = document.querySelectorAll('#chat .message.bot, #chat [data-testid="bot"]');
                if (bots.length) window.seen.push(bots[bots.length - 1].innerText);
            }).observe(document.querySelector('#chat'), {subtree: true, childList: true, characterData: true});
        """)

        def answers() -> list[str]:
            return driver.execute_script(
                "return Array.from(document.querySelectorAll('#chat [data-testid=\"bot\"]'))"
                ".map(e => e.innerText.trim())")

        def send(text: str, turn: int) -> str:
            """Types a message and returns the answer once it has stopped changing."""
            driver.find_element(By.CSS_SELECTOR, f"#{IDS['message']} textarea").send_keys(text, Keys.ENTER)
            last, since = None, time.monotonic()
            deadline = since + 60
            while time.monotonic() < deadline:
                shown = answers()
                now = shown[turn - 1] if len(shown) >= turn else None
                if now != last:
                    last, since = now, time.monotonic()
                elif now and time.monotonic() - since > 1.0:
                    return now
                time.sleep(0.05)
            raise AssertionError(f"no settled answer to turn {turn}: {answers()}")

        first = send(QUERIES[0], 1)
        grown = [s for s in driver.execute_script("return window.seen") if s.strip()]
        assert len(set(grown)) >= 2, grown  # streamed: several partial answers before the last
        max_tokens = int(driver.find_element(By.CSS_SELECTOR, "#max_tokens input[type=number]")
                         .get_attribute("value"))
        messages = [{"role": "user", "content": QUERIES[0]}]
        want = api.chat.completions.create(model="short", messages=messages, temperature=0, max_tokens=max_tokens)
        assert first == want.choices[0].message.content.strip()
        second = send("再写一段", 2)
        messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "再写一段"}]
        want = api.chat.completions.create(model="short", messages=messages, temperature=0, max_tokens=max_tokens)
        assert second == want.choices[0].message.content.strip()  # the history went through the template
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "serve-chat-page.png"
        driver.save_screenshot(str(shot))
        print(f"screenshot: {shot}")
        assert shot.stat().st_size > 10_000
        driver.find_element(By.CSS_SELECTOR, f"#{IDS['clear']}").click()
        wait.until(lambda d: not answers())  # cleared
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_sigterm_finishes_requests_in_flight_answers_the_rest_503_and_exits_zero(web_server):
    url = f"{web_server.url}/v1/completions"
    done: dict[int, list[str]] = {}
    plain: dict[int, httpx.Response | str] = {}

    def body(i: int, max_tokens: int) -> dict:
        return {"model": "long", "prompt": QUERIES[i % 8], "max_tokens": max_tokens, "ignore_eos": True,
                "temperature": 0}

    def stream(i: int, max_tokens: int) -> None:
        lines = []
        try:
            with httpx.stream("POST", url, json={**body(i, max_tokens), "stream": True}, timeout=60) as reply:
                for line in reply.iter_lines():
                    lines.append(line)
        except httpx.HTTPError as err:
            lines.append(f"error: {err}")
        done[i] = lines

    def whole(i: int, max_tokens: int) -> None:
        try:
            plain[i] = httpx.post(url, json=body(i, max_tokens), timeout=60)
        except httpx.HTTPError as err:
            plain[i] = f"error: {err}"

    def start(indices, max_tokens, target=stream):
        threads = [threading.Thread(target=target, args=(i, max_tokens)) for i in indices]
        for t in threads:
            t.start()
        return threads

    def until(condition):
        deadline = time.monotonic() + 60
        while not condition(health(web_server)) and time.monotonic() < deadline:
            time.sleep(0.005)

    # sizes from this machine's speed: the answers being decoded take about 2 s, the waiting ones far longer
    # than the 5 s --shutdown-timeout
    began = time.monotonic()
    httpx.post(url, json=body(0, 64), timeout=60).raise_for_status()
    per_token = (time.monotonic() - began) / 64
    in_flight = max(8, min(400, int(2.0 / (1.5 * per_token))))
    queued = 60  # 15 rounds of 4 slots x 480 tokens
    assert queued / 4 * 480 * per_token > 7, per_token
    threads = start(range(4), in_flight)
    until(lambda h: h["active"] == 4)
    threads += start(range(4, 4 + queued - 8), 480)
    threads += start(range(4 + queued - 8, 4 + queued), 480, target=whole)  # 8 of them not streaming
    until(lambda h: h["waiting"] == queued)
    at_signal = health(web_server)
    web_server.proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    assert web_server.proc.wait(60) == 0, web_server.errors()
    took = time.monotonic() - sent
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)  # nobody hangs
    assert at_signal["active"] == 4 and at_signal["waiting"] == queued, at_signal

    def finish(lines: list[str]) -> str | None:
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        return next((e["choices"][0]["finish_reason"] for e in events if e.get("choices")
                     and e["choices"][0]["finish_reason"]), None)

    for i in range(4):  # what was being decoded got finished
        assert finish(done[i]) == "length" and [line for line in done[i] if line][-1] == "data: [DONE]", done[i][-3:]
    # the rest, cut off after --shutdown-timeout: a stream ends with OpenAI's error as its last event, then
    # [DONE]; a plain request gets the error body with a 503
    shutting_down = {"message": "the server is shutting down", "type": "server_error", "param": None,
                     "code": "server_shutting_down"}
    cut = [i for i in range(4, 4 + queued - 8) if finish(done[i]) is None]
    assert cut, "no stream was cut off"
    for i in cut:
        lines = [line for line in done[i] if line]
        assert lines[-2:] == [f"data: {json.dumps({'error': shutting_down})}", "data: [DONE]"], lines[-3:]
    assert all(isinstance(r, httpx.Response) for r in plain.values()), plain
    refused = [r for r in plain.values() if r.status_code != 200]
    assert refused and all(r.status_code == 503 and r.json() == {"error": shutting_down} for r in refused)
    assert took < 30, took
    log = web_server.log.read_text()
    assert "Traceback" not in log and "CancelledError" not in log and "Cancel " not in log, log
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{web_server.url}/health", timeout=5)


# ---- another family: ChatGLM2-6B / ChatGLM3-6B (their built-in tiny models: transformers' GlmForCausalLM with
# the generic prefix, their own templates and stop ids) ----


@pytest.fixture(scope="module", params=["tiny-chatglm2", "tiny-chatglm3"])
def other_server(request, tmp_path_factory):
    base = tmp_path_factory.mktemp("other")
    path = f"builtin:{request.param}"
    checkpoints = {"plain4": save_random_prefix(base / "plain4", 4, seed=4, model_path=path),
                   "proj8": save_random_prefix(base / "proj8", 8, seed=5, model_path=path, projection=True,
                                               scale=10.0)}
    srv = Server("--model-path", path, *(f"--prefix={n}={p}" for n, p in checkpoints.items()), "--no-web",
                 log=tmp_path_factory.mktemp("log") / "other.log")
    yield request.param, srv, checkpoints
    assert srv.stop() == 0, srv.errors()


@pytest.mark.slow
def test_another_family_matches_evaluate_streams_and_batches_prefixes(other_server, tmp_path):
    from ptuning.evaluation.run import run

    other, server, checkpoints = other_server
    client = server.client()
    assert [m.id for m in client.models.list().data] == [other, *checkpoints]
    rows = 4
    for name, checkpoint in checkpoints.items():
        reset_accelerate()
        run(compose_evaluate([f"model={other.replace('-', '_')}", f"prefix_checkpoint={checkpoint}",
                              f"output_dir={tmp_path / name}", f"data.cache_dir={tmp_path / 'cache'}",
                              f"data.max_eval_samples={rows}", "generation.max_new_tokens=24", "batch_size=4"]))
        predictions = [r["predict"] for r in read_jsonl(tmp_path / name / "generated_predictions.jsonl")]
        served = [client.completions.create(model=name, prompt=q, max_tokens=24, temperature=0).choices[0].text
                  for q in QUERIES[:rows]]
        assert served == predictions, name
        # a row without history is one user turn (ChatGLM2's [Round 1], ChatGLM3's <|user|>): a chat turn is the
        # same prompt
        assert [greedy_chat(client, name, q) for q in QUERIES[:rows]] == predictions, name
    # chat with a system message and history, streamed and not
    messages = [{"role": "system", "content": "你是文案助手。"}, {"role": "user", "content": QUERIES[0]},
                {"role": "assistant", "content": "这条裤子很好看。"}, {"role": "user", "content": "再写一段"}]
    whole = client.chat.completions.create(model="proj8", messages=messages, max_tokens=32, temperature=0)
    chunks = list(client.chat.completions.create(model="proj8", messages=messages, max_tokens=32, temperature=0,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert whole.usage.prompt_tokens > 20
    # rows of both prefixes and of the base model in one batch answer as they do alone
    requests = [(name, q) for q in QUERIES for name in (other, *checkpoints)]
    alone = [greedy_chat(client, name, q) for name, q in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        assert list(pool.map(lambda r: greedy_chat(client, *r), requests)) == alone
    assert len({tuple(a for (n, _), a in zip(requests, alone, strict=True) if n == name)
                for name in (other, *checkpoints)}) == 3


@pytest.mark.parametrize("family", ["tiny-chatglm", "tiny-chatglm2"])
def test_a_model_folder_with_its_prefix_inside_is_served_with_it_and_each_prefix_source_is_named(family, tmp_path):
    from ptuning import export as export_cli
    from ptuning.evaluation.run import run

    path = f"builtin:{family}"
    inside = save_random_prefix(tmp_path / "inside", 4, seed=6, model_path=path)
    other = save_random_prefix(tmp_path / "other", 8, seed=7, model_path=path)
    full = tmp_path / "full"  # the whole model with the prefix inside, as export full writes it
    assert export_cli.main(["full", "--checkpoint", str(inside), "--out", str(full)]) == 0
    server = Server("--model-path", str(full), f"--prefix=other={other}", "--no-web", log=tmp_path / "server.log")
    try:
        label = "chatglm" if family == "tiny-chatglm" else "chatglm2"
        assert server.output[0] == (
            f"serving {full} ({label}, float32 on cpu) with prefixes full (P=4, from {full}, a whole model with its "
            f"prefix inside), other (P=8, from {other}, ours (prefix.safetensors))")
        client = server.client()
        assert [m.id for m in client.models.list().data] == ["full-base", "full", "other"]
        rows = 3
        for name, checkpoint in (("full", inside), ("other", other)):  # as evaluate.py answers on the base model
            reset_accelerate()
            run(compose_evaluate([f"model={'tiny' if family == 'tiny-chatglm' else family.replace('-', '_')}",
                                  f"prefix_checkpoint={checkpoint}", f"output_dir={tmp_path / f'{name}-eval'}",
                                  f"data.cache_dir={tmp_path / 'cache'}",
                                  f"data.max_eval_samples={rows}", "generation.max_new_tokens=16"]))
            predictions = [r["predict"] for r in read_jsonl(tmp_path / f"{name}-eval" / "generated_predictions.jsonl")]
            served = [client.completions.create(model=name, prompt=q, max_tokens=16, temperature=0).choices[0].text
                      for q in QUERIES[:rows]]
            assert served == predictions, name
        bare = [client.completions.create(model="full-base", prompt=q, max_tokens=16, temperature=0).choices[0].text
                for q in QUERIES[:rows]]
        assert bare != served
    finally:
        assert server.stop() == 0, server.errors()
