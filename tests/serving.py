"""Helpers of the server tests: prefix checkpoints made in a test, and ``python -m ptuning.serve`` started on a
free loopback port."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .common import ROOT

LISTENING = re.compile(r"listening on (http://\S+) ")


def save_random_prefix(folder: Path, pre_seq_len: int, seed: int, *, scale: float = 3.0,
                       model_path: str | None = None, projection: bool = False,
                       original_format: bool = False) -> Path:
    """A checkpoint of a random prefix for ``model_path`` (None = the built-in tiny ChatGLM-6B):
    ``folder/run/checkpoint-1`` in our format, or ``folder/original/pytorch_model.bin`` alone as the original
    P-Tuning v2 script saved it. Returns the checkpoint folder.

    The prefix is initialised as a fresh training run does, its keys and values then multiplied by ``scale``:
    at the initial N(0, 1) a random prefix barely changes the tiny model's answers, and the tests need
    prefixes whose answers differ."""
    import torch

    from ptuning.build import load
    from ptuning.checkpoint import export_original, prefix_metadata, save_checkpoint
    from ptuning.config import ModelConfig
    from ptuning.prefix import prefix_module_name, reset_prefix

    cfg = ModelConfig(path=model_path, pre_seq_len=pre_seq_len, prefix_projection=projection)
    model = load(cfg, init=False).model
    torch.manual_seed(seed)
    encoder = model.get_submodule(prefix_module_name(model))
    reset_prefix(encoder)
    last = encoder.trans[2] if projection else encoder.embedding  # what the keys and values come out of
    with torch.no_grad():
        for param in last.parameters():
            param.mul_(scale)
    checkpoint = save_checkpoint(folder / "run", 1, model, prefix_metadata(model, cfg.base_model_name))
    if not original_format:
        return checkpoint
    export_original(checkpoint, folder / "original")
    (folder / "original" / "prefix_config.json").unlink()  # the original script wrote the weights alone
    return folder / "original"


def server_env() -> dict:
    env = dict(os.environ)
    # CPU, one intra-op thread: the tiny model's ops are microseconds; threads that wait for a core only slow it
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


class Server:
    """``python -m ptuning.serve ARGS --port 0`` in a child process, ready once it says where it listens.

    Attributes:
        url: ``http://127.0.0.1:<port>``.
        proc: the process.
        output: its stdout lines so far.
    """

    def __init__(self, *args: str, log: Path, timeout: float = 180.0):
        self.log = log
        self._err = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ptuning.serve", "--host", "127.0.0.1", "--port", "0", *args],
            cwd=ROOT, env=server_env(), stdout=subprocess.PIPE, stderr=self._err, text=True,
        )
        self.output: list[str] = []
        ready = threading.Event()

        def read():
            for line in self.proc.stdout:
                self.output.append(line.rstrip("\n"))
                if LISTENING.search(line):
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not ready.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start (exit {self.proc.returncode}):\n{self.errors()}")
        self.url = LISTENING.search("\n".join(self.output)).group(1)

    def errors(self) -> str:
        return Path(self.log).read_text()[-4000:]

    def client(self, api_key: str = "unused", **kwargs):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=120, **kwargs)

    def rss(self) -> int:
        """The server process's resident memory in bytes."""
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._err.close()
        return self.proc.returncode
