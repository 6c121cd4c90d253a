"""Interactive chat with a prefix-tuned ChatGLM: ``python -m ptuning.chat`` or ``ptuning-chat``.

The base model (``--model-path``, default the built-in tiny model) and a prefix checkpoint
(``--prefix-checkpoint``, ours or the original P-Tuning v2 format; default the latest checkpoint of
``outputs/default``) are loaded once. Every turn is rendered with :func:`ptuning.data.build_prompt` (the
template training and evaluation use) over the conversation so far, and the answer is streamed token by
token with the same generation code as ``evaluate.py``. Type ``clear`` to start a new conversation and
``exit`` to quit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from .config import ConfigError
from .evaluation.generate import GenerationSettings

BANNER = "Type a message and press Enter; `clear` starts a new conversation, `exit` quits."
USER_PREFIX = "You: "
BOT_PREFIX = "ChatGLM: "
CLEAR, EXIT = "clear", "exit"


class IncrementalDecoder:
    """Turns token ids arriving one at a time into text that can be printed as it comes.

    A Chinese character the tokenizer has no piece for is spelled as several byte pieces; decoding only
    some of them yields U+FFFD. The decoder re-decodes everything generated so far and holds back the
    text while it ends in an incomplete character, so every printed piece is final. A byte sequence that
    the model left incomplete (another piece followed, or the answer ended) is no character: it is dropped
    from the printed text and from :attr:`text`, which goes into the history.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.printed = ""

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Adds one id; returns the new printable text (possibly empty)."""
        self.ids.append(token_id)
        text = self._decode()
        if text.endswith("\ufffd"):
            return ""
        return self._advance(text.replace("\ufffd", ""))

    def flush(self) -> str:
        """The text still held back at the end of the answer. A byte sequence the model never completed
        is no character: it is dropped rather than shown as U+FFFD."""
        return self._advance(self._decode().replace("\ufffd", ""))

    def _advance(self, text: str) -> str:
        if text.startswith(self.printed):
            new = text[len(self.printed) :]
        else:
            # decoding a longer sequence may rewrite its tail (whitespace handling); what was printed
            # stays, so go on after the part both agree on
            new = text[len(os.path.commonprefix([self.printed, text])) :]
        self.printed = text
        return new

    @property
    def text(self) -> str:
        """The whole answer printed so far."""
        return self.printed


class ChatSession:
    """A conversation: the history of ``(query, response)`` turns and how a new turn becomes model input.

    Args:
        model: a ChatGLM (with its prefix loaded, or without a prefix).
        tokenizer: its tokenizer.
        settings: generation settings for every answer.
    """

    def __init__(self, model, tokenizer, settings: GenerationSettings):
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.history: list[tuple[str, str]] = []
        # prompt + answer must fit the positions the model was built for
        self.max_length = int(getattr(model.config, "max_sequence_length", 2048) or 2048)

    def clear(self) -> None:
        """Forgets the conversation."""
        self.history = []

    def encode(self, prompt: str) -> list[int]:
        """Prompt ids as training and evaluation build them: the text's pieces, then ``[gMASK] <sop>``."""
        pieces = self.tokenizer.convert_tokens_to_ids(self.tokenizer.tokenize(prompt))
        return self.tokenizer.build_inputs_with_special_tokens(pieces)

    def prepare(self, query: str) -> tuple[str, list[int], int]:
        """The prompt text and ids for ``query`` after the history, and how many old turns were dropped.

        The oldest turns are left out when the prompt and ``max_new_tokens`` would not fit the model's
        ``max_sequence_length``.

        Raises:
            ConfigError: the query alone is too long.
        """
        from .data import build_prompt

        budget = self.max_length - self.settings.max_new_tokens
        for dropped in range(len(self.history) + 1):
            prompt = build_prompt(query, self.history[dropped:])
            ids = self.encode(prompt)
            if len(ids) <= budget:
                return prompt, ids, dropped
        raise ConfigError(
            f"the message is {len(ids)} tokens; at most {budget} fit with --max-new-tokens "
            f"{self.settings.max_new_tokens} (the model takes {self.max_length} positions)"
        )

    def reply(self, query: str, ids: list[int]) -> Iterator[str]:
        """Streams the answer to ``query`` (prepared as ``ids``) as printable text pieces; when the answer is
        complete it joins the history. An answer cut short (the consumer stops early) is not kept."""
        from .evaluation.generate import stream_ids

        decoder = IncrementalDecoder(self.tokenizer)
        tokens = stream_ids(
            self.model,
            ids,
            self.settings,
            pad_id=self.tokenizer.pad_token_id,
            eos_id=self.tokenizer.eos_token_id,
        )
        try:
            for token in tokens:
                piece = decoder.push(token)
                if piece:
                    yield piece
        finally:
            tokens.close()  # stops the generation thread when the consumer gave up early
        rest = decoder.flush()
        if rest:
            yield rest
        self.history.append((query, decoder.text.strip()))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ptuning-chat",
        description="Chat with ChatGLM and a P-Tuning v2 prefix. " + BANNER,
    )
    parser.add_argument(
        "--model-path", default=None, help="a ChatGLM-6B folder (default: the built-in tiny model)"
    )
    parser.add_argument(
        "--prefix-checkpoint",
        default=None,
        help="a checkpoint folder, ours or the original P-Tuning v2's (or a training output folder: its latest); "
        "default: the latest checkpoint of outputs/default",
    )
    parser.add_argument("--no-prefix", action="store_true", help="chat with the base model alone")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit (default 256)")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--top-p", type=float, default=0.7, help="nucleus sampling mass (default 0.7)")
    parser.add_argument("--temperature", type=float, default=0.95, help="sampling temperature (default 0.95)")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling")
    parser.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="backbone dtype (auto: bfloat16 on a GPU, float32 on a CPU)",
    )
    parser.add_argument(
        "--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: cuda when available)"
    )
    parser.add_argument(
        "--show-prompt",
        action="store_true",
        help="write each turn's full prompt to stderr as a JSON line (to check the history template)",
    )
    return parser.parse_args(argv)


def load(args: argparse.Namespace):
    """The model (prefix loaded), its tokenizer, and a description of what was loaded.

    Raises:
        ConfigError, CheckpointError: a path or value that cannot work.
    """
    import torch

    from .build import base_metadata, load_model, load_tokenizer
    from .config import ModelConfig
    from .evaluation.run import resolve_checkpoint
    from .perf import set_cpu_threads
    from .training.checkpoint import base_model_change, infer_prefix_shape, load_prefix, read_prefix

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device={args.device}: CUDA is not available on this machine")
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if args.model_path is not None and not Path(args.model_path).expanduser().is_dir():
        raise ConfigError(f"--model-path={args.model_path}: no such folder (expected a ChatGLM-6B folder)")
    cfg = ModelConfig(path=args.model_path, dtype=dtype)
    cfg.validate()
    checkpoint = None
    if not args.no_prefix:
        checkpoint = resolve_checkpoint(args.prefix_checkpoint, key="--prefix-checkpoint")
        prefix, meta = read_prefix(checkpoint)
        shape = meta if meta and "pre_seq_len" in meta else infer_prefix_shape(prefix)
        cfg.pre_seq_len = shape["pre_seq_len"]
        cfg.prefix_projection = shape.get("prefix_projection", False)
    else:
        cfg.pre_seq_len = None  # no prefix encoder at all
    model = load_model(cfg, device=device)
    set_cpu_threads(model.config, device)
    tokenizer = load_tokenizer(cfg, vocab_size=model.config.vocab_size)
    if checkpoint is not None:
        changed = base_model_change(load_prefix(model, checkpoint), base_metadata(cfg, model.config))
        if changed:
            print(f"warning: {checkpoint} {changed}", file=sys.stderr)
    model.eval()
    name = "the built-in tiny model" if cfg.path is None else str(Path(cfg.path))
    what = f"{name} + prefix {checkpoint}" if checkpoint is not None else f"{name} (no prefix)"
    return model, tokenizer, what


def chat_loop(session: ChatSession, *, read=input, out=sys.stdout, err=sys.stderr, show_prompt=False) -> None:
    """Reads messages until ``exit`` or end of input and streams each answer to ``out``.

    Args:
        session: the conversation.
        read: reads one message, given the input prompt (``input`` by default); raises EOFError at the end.
        out: where answers go.
        err: where notes and ``--show-prompt`` lines go.
        show_prompt: write each turn's prompt to ``err`` as ``{"turn", "prompt", "prompt_tokens"}``.
    """
    turn = 0
    while True:
        try:
            query = read(USER_PREFIX).strip()
        except EOFError:
            out.write("\n")
            return
        if not query:
            continue
        if query == EXIT:
            return
        if query == CLEAR:
            session.clear()
            out.write("(conversation cleared)\n")
            continue
        try:
            prompt, ids, dropped = session.prepare(query)
        except ConfigError as error:
            err.write(f"error: {error}\n")
            continue
        if dropped:
            err.write(f"(left out the oldest {dropped} turn(s) to fit the model's context)\n")
        if show_prompt:
            err.write(
                json.dumps({"turn": turn, "prompt": prompt, "prompt_tokens": len(ids)}, ensure_ascii=False)
            )
            err.write("\n")
            err.flush()
        out.write(BOT_PREFIX)
        out.flush()
        answer = session.reply(query, ids)
        try:
            for piece in answer:
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            answer.close()  # stops generating; the cut answer is not kept in the history
            out.write(" [interrupted]\n")
            continue
        out.write("\n")
        out.flush()
        turn += 1


def main(argv: list[str] | None = None) -> int:
    """``ptuning-chat``: loads the model and the prefix, then chats on stdin / stdout.

    Returns:
        The exit status: 0, 2 after a one-line ``error: ...`` on stderr for a user mistake, or 130 after
        Ctrl-C while loading.
    """
    args = parse_args(argv)
    from .model.loading import CheckpointError

    try:
        settings = GenerationSettings(
            max_new_tokens=args.max_new_tokens,
            do_sample=args.do_sample,
            top_p=args.top_p,
            temperature=args.temperature,
        ).validate(prefix="--")
        model, tokenizer, what = load(args)
    except (ConfigError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while loading
        print("\ninterrupted", file=sys.stderr)
        return 130
    if args.seed is not None:
        from transformers import set_seed

        set_seed(args.seed)
    session = ChatSession(model, tokenizer, settings)
    print(f"Chatting with {what}, {'sampling' if settings.do_sample else 'greedy decoding'}.")
    print(BANNER)
    try:
        chat_loop(session, show_prompt=args.show_prompt)
    except KeyboardInterrupt:  # Ctrl-C at the input prompt: leave quietly
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
