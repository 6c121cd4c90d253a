"""Serving throughput: ``python -m ptuning.serve`` on the bench shape, loaded by streaming HTTP clients.

    python benchmarks/bench_serve.py            # CPU; prints a table, writes benchmarks/results-serve-cpu.json
    python benchmarks/bench_serve.py --quick    # fewer requests per measurement
    python benchmarks/bench_serve.py --device cuda --json benchmarks/results-serve-gpu.json

The model: the bench shape (``ptuning.perf.BENCH_SHAPE``: ChatGLM-6B's architecture at hidden 512, 8 heads,
4 layers, inner 2048, vocabulary 32000) with random weights, saved to a temporary folder with the built-in
tokenizer, and four random prefixes of P = 32. The server runs in its own process (API only, float32 on a CPU,
bfloat16 on a GPU, ``--max-batch-size 32``); the clients (asyncio + httpx on loopback, in this process) send
completion requests of an 81-token prompt for exactly 64 new tokens (``ignore_eos``), greedy, streamed.

Measured: requests/s and generated tokens/s with 1, 8 and 32 concurrent clients (each client sends its next
request when the previous one ends); 32 clients spread over the 4 prefixes against the same 32 on one prefix
(the ratio of tokens/s: what mixing prefixes in one batch costs); time to first token at 8 clients. Not a test:
the numbers depend on the machine, which is printed with them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ptuning.perf import BENCH_SHAPE  # noqa: E402

PREFIXES = 4
NEW_TOKENS = 64
PROMPT = "类型#裙*材质#羊毛*颜色#灰色*风格#简约*裙型#A字裙*裙长#长裙，写一段适合电商详情页的文案，突出面料、版型和搭配。"


def make_model(folder: Path) -> tuple[Path, list[Path]]:
    """The bench-shape model folder (random weights, the built-in tokenizer) and four prefix checkpoints."""
    import torch

    from ptuning.build import load
    from ptuning.checkpoint import prefix_metadata, save_checkpoint
    from ptuning.config import ModelConfig
    from ptuning.models.chatglm import ChatGLMForConditionalGeneration, tiny_config
    from ptuning.prefix import prefix_module_name, reset_prefix

    shape = {k: v for k, v in BENCH_SHAPE.items() if k != "pre_seq_len"}
    torch.manual_seed(0)
    model_dir = folder / "bench-model"
    ChatGLMForConditionalGeneration(tiny_config(**shape, max_sequence_length=2048)).save_pretrained(model_dir)
    for name in ("ice_text.model", "tokenizer_config.json"):
        shutil.copy(ROOT / "data" / "tiny-chatglm" / name, model_dir / name)
    checkpoints = []
    for i in range(PREFIXES):
        cfg = ModelConfig(path=str(model_dir), pre_seq_len=BENCH_SHAPE["pre_seq_len"])
        model = load(cfg, init=False).model
        torch.manual_seed(1 + i)
        reset_prefix(model.get_submodule(prefix_module_name(model)))
        checkpoints.append(save_checkpoint(folder / f"prefix{i}", 1, model, prefix_metadata(model, cfg.base_model_name)))
    return model_dir, checkpoints


class ServerProcess:
    def __init__(self, model_dir: Path, checkpoints: list[Path], device: str, threads: int | None):
        args = [sys.executable, "-m", "ptuning.serve", "--model-path", str(model_dir), "--no-web", "--port", "0",
                "--max-batch-size", "32", "--device", device, "--default-max-tokens", str(NEW_TOKENS)]
        for i, checkpoint in enumerate(checkpoints):
            args += ["--prefix", f"p{i}={checkpoint}"]
        env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        for line in self.proc.stdout:
            found = re.search(r"listening on (http://\S+) ", line)
            if found:
                self.url = found.group(1)
                return
        raise RuntimeError(f"the server did not start (exit {self.proc.wait()})")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


async def one_request(http, url: str, model: str) -> dict:
    body = {"model": model, "prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    tokens = 0
    async with http.stream("POST", f"{url}/v1/completions", json=body) as reply:
        reply.raise_for_status()
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"][0]["text"]:
                first = time.perf_counter()
    end = time.perf_counter()
    return {"start": start, "first": first if first is not None else end, "end": end, "tokens": tokens}


async def load(url: str, clients: int, total: int, models: list[str]) -> dict:
    """``clients`` workers send ``total`` requests in all (request i uses ``models[i % len(models)]``)."""
    import httpx

    queue = list(range(total))
    results = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:

        async def worker():
            while queue:
                i = queue.pop(0)
                results.append(await one_request(http, url, models[i % len(models)]))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - start
    ttft = sorted(r["first"] - r["start"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    assert tokens == total * NEW_TOKENS, (tokens, total)
    return {"clients": clients, "requests": total, "prefixes": len(models), "wall_s": wall,
            "requests_per_s": total / wall, "tokens_per_s": tokens / wall,
            "ttft_median_s": statistics.median(ttft), "ttft_p90_s": ttft[int(0.9 * (len(ttft) - 1))],
            "latency_median_s": statistics.median(r["end"] - r["start"] for r in results)}


def machine(device: str, threads: int | None) -> dict:
    import torch

    from ptuning.perf import cpu_model

    cpu = cpu_model()
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "device": device,
            "python": platform.python_version(), "server_threads": threads or torch.get_num_threads(),
            "load_average_after": os.getloadavg()[0]}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer requests per measurement")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results-serve-cpu.json"))
    parser.add_argument("--threads", type=int, default=None,
                        help="the server's intra-op threads (default: torch's); 1 on a machine shared with other work")
    args = parser.parse_args()
    rounds = 1 if args.quick else 2  # requests per client in each measurement (at least 8 in all)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        print("writing the bench-shape model and 4 prefixes ...", file=sys.stderr, flush=True)
        model_dir, checkpoints = make_model(Path(tmp))
        print("starting the server ...", file=sys.stderr, flush=True)
        server = ServerProcess(model_dir, checkpoints, args.device, args.threads)
        try:
            one, four = ["p0"], [f"p{i}" for i in range(PREFIXES)]
            asyncio.run(load(server.url, 8, 16, four))  # warm-up
            plan = {
                "1 client": (1, max(8, rounds * 4), one),
                "8 clients": (8, 8 * rounds, one),
                "32 clients, one prefix": (32, 32 * rounds, one),
                "32 clients, 4 prefixes": (32, 32 * rounds, four),
            }
            rows = {}
            for name, (clients, total, models) in plan.items():
                print(f"measuring {name} ...", file=sys.stderr, flush=True)
                rows[name] = asyncio.run(load(server.url, clients, total, models))
        finally:
            server.stop()
    info = machine(args.device, args.threads)
    ratio = rows["32 clients, 4 prefixes"]["tokens_per_s"] / rows["32 clients, one prefix"]["tokens_per_s"]
    print(f"\nmachine: {info}")
    print(f"model: bench shape {BENCH_SHAPE}, {PREFIXES} prefixes; {NEW_TOKENS} new tokens per request, greedy\n")
    print("| clients | requests | requests/s | generated tokens/s | time to first token, median (p90) | latency, median |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['requests']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
              f"{r['ttft_median_s'] * 1000:.0f} ms ({r['ttft_p90_s'] * 1000:.0f} ms) | {r['latency_median_s']:.2f} s |")
    print(f"\n32 clients over 4 prefixes / on one prefix, tokens/s: {ratio:.3f} (one run)")
    Path(args.json).write_text(json.dumps({"machine": info, "results": rows, "mixed_over_single": ratio},
                                          indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
