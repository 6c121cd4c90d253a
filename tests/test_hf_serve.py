"""``python -m ptuning.serve`` with the transformers-decoder family (the built-in tiny GLM-4) and two prefixes:
completions are plain prompts and equal ``evaluate.py``'s predictions on ADGEN rows; chat goes through the chat
template; rows of both prefixes and of the base model in one batch answer as they do alone."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from .serving import Server, save_random_prefix
from .test_evaluate import compose_evaluate, read_jsonl, reset_accelerate
from .test_serve import QUERIES, greedy_chat

BASE = "tiny-glm4"


@pytest.fixture(scope="module")
def glm4_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("glm4-serve")
    path = f"builtin:{BASE}"
    checkpoints = {"plain4": save_random_prefix(folder / "plain4", 4, seed=4, model_path=path),
                   "proj8": save_random_prefix(folder / "proj8", 8, seed=5, model_path=path, projection=True,
                                               scale=10.0)}
    server = Server("--model-path", path, *(f"--prefix={n}={p}" for n, p in checkpoints.items()), "--no-web",
                    log=tmp_path_factory.mktemp("log") / "glm4.log")
    yield server, checkpoints
    assert server.stop() == 0, server.errors()


def completion(client, model: str, prompt: str, max_tokens: int = 24) -> str:
    return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0).choices[0].text


@pytest.mark.slow
def test_completions_equal_evaluate_and_mixed_batches_equal_alone(glm4_server, tmp_path):
    from ptuning.evaluation.run import run

    server, checkpoints = glm4_server
    client = server.client()
    assert [m.id for m in client.models.list().data] == [BASE, *checkpoints]
    rows = 4
    for name, checkpoint in checkpoints.items():
        reset_accelerate()
        run(compose_evaluate(["model=tiny_glm4", f"prefix_checkpoint={checkpoint}", f"output_dir={tmp_path / name}",
                              f"data.cache_dir={tmp_path / 'cache'}", f"data.max_eval_samples={rows}",
                              "generation.max_new_tokens=24", "batch_size=4"]))
        predictions = [r["predict"] for r in read_jsonl(tmp_path / name / "generated_predictions.jsonl")]
        assert [completion(client, name, q) for q in QUERIES[:rows]] == predictions, name
    # chat requests go through the chat template: another prompt, so (here) other answers
    chat = [greedy_chat(client, "plain4", q) for q in QUERIES[:rows]]
    assert chat != [completion(client, "plain4", q) for q in QUERIES[:rows]]
    requests = [(kind, name, q) for q in QUERIES[:4] for name in (BASE, *checkpoints) for kind in ("chat", "text")]

    def ask(kind, name, q):
        return greedy_chat(client, name, q) if kind == "chat" else completion(client, name, q)

    alone = [ask(*r) for r in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        assert list(pool.map(lambda r: ask(*r), requests)) == alone
    assert len({tuple(a for (k, n, _), a in zip(requests, alone, strict=True) if n == name and k == "text")
                for name in (BASE, *checkpoints)}) == 3
