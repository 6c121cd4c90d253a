"""ChatGLM-6B at its real size on a CPU: load, train the prefix, generate, from a checkpoint laid out as published.

    python benchmarks/bench_6b_cpu.py                      # the real shape: ~12.5 GiB of float16 shards
    python benchmarks/bench_6b_cpu.py --layers 2           # the same widths, 2 layers (a quick rehearsal)
    python benchmarks/bench_6b_cpu.py --tmpdir /mnt/big    # where the temporary checkpoint goes

Steps: (1) a child process writes a random ChatGLM-6B-shaped checkpoint (28 layers, hidden 4096, 32 heads,
inner 16384, vocab 130528) in the original layout: ``config.json``, eight float16
``pytorch_model-0000N-of-00008.bin`` shards with ``pytorch_model.bin.index.json`` (the original keys, the
per-layer ``rotary_emb.inv_freq`` included), and a tokenizer (below), into a temporary folder that is removed
at the end, also on an error or Ctrl-C. (2) For ``model.quantization_bit`` 0 (bfloat16) and 4 (NF4), a fresh
process loads the folder through ``ptuning.build.load`` (``model.dtype=bfloat16``, ``model.pre_seq_len=128``),
runs 2 training steps of the prefix (batch 1, 64 prompt + 64 target tokens, bf16 autocast, AdamW, gradient
clipping, as the training loop does) and greedy generation of 16 tokens after a 64-token prompt.

Reported per run: load time, peak RSS while loading and over the whole run, the bound it must stay under
(1.15 x the bfloat16 weight bytes + 1 GiB: the weights once, no second copy while the shards are read),
each step's time, the prefill (the time to the first new token) and the decode rate after it (tokens/s).
The exit status is 1 when a run exceeds the bound.

The weights are random (normal, std 0.02; layer norms 1 and 0), so the generated text means nothing; the
timings do not depend on the values. The tokenizer is the bundled ``data/tokenizer`` (990 learned pieces)
padded with unused pieces so that its special tokens sit at the real ids 130000..130007; the training row
and the prompt are ADGEN sample text rendered by the ChatGLM-6B template, cut to exactly 64 + 64 tokens.

Before writing, the free space of the temporary directory (``df -h``) and the available memory are checked;
too little of either stops the run with a message saying how much is needed.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GIB = 2**30
SHARDS = 8
REAL = dict(num_layers=28, hidden_size=4096, num_attention_heads=32, inner_hidden_size=16384, vocab_size=130528)
SPECIAL_TOKENS = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
REAL_SPECIAL_START = 130000  # [MASK]; the real ice_text.model's special tokens follow at 130001..130007
RSS_FACTOR, RSS_SLACK = 1.15, GIB  # the bound on peak RSS: RSS_FACTOR x bf16 weight bytes + RSS_SLACK


# ---------------------------------------------------------------- the checkpoint


def special_start(vocab_size: int) -> int:
    """Where the eight special tokens go: the real ids when the vocabulary has room, else its last 8 ids."""
    return REAL_SPECIAL_START if vocab_size >= REAL_SPECIAL_START + len(SPECIAL_TOKENS) else vocab_size - len(SPECIAL_TOKENS)


def config_json(shape: dict) -> dict:
    """The original ``config.json`` of chatglm-6b with this shape (its ``auto_map`` is kept, and ignored)."""
    start = special_start(shape["vocab_size"])
    return {
        "_name_or_path": "THUDM/chatglm-6b",
        "architectures": ["ChatGLMModel"],
        "auto_map": {
            "AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        },
        "bos_token_id": start + 4,
        "eos_token_id": start + 5,
        "mask_token_id": start,
        "gmask_token_id": start + 1,
        "pad_token_id": 3,
        "hidden_size": shape["hidden_size"],
        "inner_hidden_size": shape["inner_hidden_size"],
        "layernorm_epsilon": 1e-05,
        "max_sequence_length": 2048,
        "model_type": "chatglm",
        "num_attention_heads": shape["num_attention_heads"],
        "num_layers": shape["num_layers"],
        "position_encoding_2d": True,
        "torch_dtype": "float16",
        "transformers_version": "4.27.1",
        "use_cache": True,
        "vocab_size": shape["vocab_size"],
    }


def checkpoint_keys(shape: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every key of the original checkpoint with its shape, in the original order."""
    h, inner, v = shape["hidden_size"], shape["inner_hidden_size"], shape["vocab_size"]
    rot = h // shape["num_attention_heads"] // 2  # the rotary dimension of each half of a head
    keys = [("transformer.word_embeddings.weight", (v, h))]
    for i in range(shape["num_layers"]):
        p = f"transformer.layers.{i}."
        keys += [
            (p + "input_layernorm.weight", (h,)),
            (p + "input_layernorm.bias", (h,)),
            (p + "attention.rotary_emb.inv_freq", (rot // 2,)),
            (p + "attention.query_key_value.weight", (3 * h, h)),
            (p + "attention.query_key_value.bias", (3 * h,)),
            (p + "attention.dense.weight", (h, h)),
            (p + "attention.dense.bias", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.bias", (h,)),
            (p + "mlp.dense_h_to_4h.weight", (inner, h)),
            (p + "mlp.dense_h_to_4h.bias", (inner,)),
            (p + "mlp.dense_4h_to_h.weight", (h, inner)),
            (p + "mlp.dense_4h_to_h.bias", (h,)),
        ]
    keys += [("transformer.final_layernorm.weight", (h,)), ("transformer.final_layernorm.bias", (h,)),
             ("lm_head.weight", (v, h))]
    return keys


def numel(dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def checkpoint_bytes(shape: dict) -> int:
    """Bytes of the float16 weights (what the shards hold, and what bfloat16 weights take in memory)."""
    return sum(2 * numel(dims) for _, dims in checkpoint_keys(shape))


def shard_plan(shape: dict, shards: int = SHARDS) -> list[list[tuple[str, tuple[int, ...]]]]:
    """The keys split in order into ``shards`` groups of about equal bytes (exactly ``shards`` groups: at
    reduced sizes the last keys get a shard each when the bytes alone would make fewer)."""
    keys = checkpoint_keys(shape)
    target = checkpoint_bytes(shape) / shards
    groups: list[list] = [[]]
    size = 0
    for i, (key, dims) in enumerate(keys):
        nbytes = 2 * numel(dims)
        unopened = shards - len(groups)
        if groups[-1] and unopened and (size + nbytes / 2 > target or len(keys) - i <= unopened):
            groups.append([])
            size = 0
        groups[-1].append((key, dims))
        size += nbytes
    return groups


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """The bundled tokenizer with unused pieces in front of its special tokens, which land on the ids the
    config names (130000.. at the real vocabulary size)."""
    from sentencepiece import sentencepiece_model_pb2 as sp_model

    source = ROOT / "data" / "tokenizer"
    model = sp_model.ModelProto()
    model.ParseFromString((source / "ice_text.model").read_bytes())
    pieces = list(model.pieces)
    if [p.piece for p in pieces[-len(SPECIAL_TOKENS):]] != SPECIAL_TOKENS:
        raise SystemExit(f"{source / 'ice_text.model'}: expected the ChatGLM special tokens as its last pieces")
    specials = pieces[-len(SPECIAL_TOKENS):]
    learned = len(pieces) - len(SPECIAL_TOKENS)
    start = special_start(vocab_size)
    if start < learned:
        raise SystemExit(f"--vocab {vocab_size}: needs at least {learned + len(SPECIAL_TOKENS)} ids for the tokenizer")
    del model.pieces[learned:]
    for i in range(learned, start):
        filler = model.pieces.add()
        filler.piece = f"<unused_filler_{i}>"
        filler.score = 0.0
        filler.type = sp_model.ModelProto.SentencePiece.UNUSED
    for special in specials:
        model.pieces.append(special)
    (folder / "ice_text.model").write_bytes(model.SerializeToString())
    shutil.copy(source / "tokenizer_config.json", folder / "tokenizer_config.json")


def write_checkpoint(folder: Path, shape: dict, *, shards: int = SHARDS, seed: int = 0) -> int:
    """Writes the random checkpoint (one shard in memory at a time). Returns the bytes of its shards."""
    import torch

    from ptuning.models.chatglm.layers import rotary_inv_freq

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_json(shape), indent=2) + "\n")
    write_tokenizer(folder, shape["vocab_size"])
    g = torch.Generator().manual_seed(seed)
    plan = shard_plan(shape, shards)
    weight_map, total = {}, 0
    for n, group in enumerate(plan, start=1):
        name = f"pytorch_model-{n:05d}-of-{len(plan):05d}.bin"
        part = {}
        for key, dims in group:
            if key.endswith("inv_freq"):
                part[key] = rotary_inv_freq(2 * 2 * dims[0]).half()
            elif "layernorm" in key:
                part[key] = (torch.ones if key.endswith("weight") else torch.zeros)(dims, dtype=torch.float16)
            elif key.endswith("bias"):
                part[key] = torch.zeros(dims, dtype=torch.float16)
            else:
                part[key] = torch.empty(dims, dtype=torch.float16).normal_(0.0, 0.02, generator=g)
            weight_map[key] = name
            total += part[key].numel() * 2
        torch.save(part, folder / name)
        del part
        print(f"  wrote {name}", file=sys.stderr, flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


# ---------------------------------------------------------------- one run (a fresh process per setting)


def rss_now() -> tuple[int, int]:
    """Current and peak resident set size of this process in bytes (``VmRSS``, ``VmHWM``)."""
    status = Path("/proc/self/status").read_text()
    return tuple(int(re.search(rf"{k}:\s+(\d+) kB", status).group(1)) * 1024 for k in ("VmRSS", "VmHWM"))


def reset_peak_rss() -> bool:
    """Restarts the kernel's peak-RSS count of this process (``/proc/self/clear_refs``); False if refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def adgen_texts(count: int = 40) -> tuple[str, str]:
    """A long query and a long answer joined from the bundled ADGEN sample (enough for 64 + 64 tokens)."""
    lines = (ROOT / "data" / "adgen_sample" / "train.json").read_text(encoding="utf-8").splitlines()[:count]
    rows = [json.loads(line) for line in lines]
    return "，".join(r["content"] for r in rows), "".join(r["summary"] for r in rows)


class TokenClock:
    """A ``generate()`` streamer that only notes when each new token arrives (the first ``put`` is the prompt)."""

    def __init__(self):
        self.start = 0.0
        self.token_times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if self._prompt_seen:
            self.token_times.append(time.perf_counter() - self.start)
        self._prompt_seen = True

    def end(self) -> None:
        pass


def run_one(folder: Path, bits: int, steps: int, new_tokens: int, pre_seq_len: int, prompt_len: int,
            target_len: int) -> dict:
    import torch

    from ptuning.build import load
    from ptuning.config import ModelConfig
    from ptuning.models.base import Conversation
    from ptuning.prefix import mark_only_prefix_trainable
    from ptuning.quantization import weight_bytes
    from ptuning.training.loop import token_loss_sum

    torch.manual_seed(0)
    cfg = ModelConfig(path=str(folder), dtype="bfloat16", pre_seq_len=pre_seq_len, quantization_bit=bits)
    cfg.validate()
    base_rss, _ = rss_now()
    exact_peak = reset_peak_rss()
    start = time.perf_counter()
    loaded = load(cfg)
    load_s = time.perf_counter() - start
    load_rss, load_peak = rss_now()
    model, template = loaded.model, loaded.template

    query, answer = adgen_texts()
    row = template.train_row(Conversation(query=query), answer, prompt_len, target_len)
    ids = torch.tensor([row.input_ids])
    labels = torch.tensor([row.labels])
    targets = int((labels[:, 1:] != -100).sum())
    mark_only_prefix_trainable(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-2)
    model.train()
    step_s, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = token_loss_sum(model, ids, labels) / targets
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_s.append(time.perf_counter() - start)
        losses.append(loss.item())
    _, train_peak = rss_now()

    model.eval()
    prompt = template.prompt(Conversation(query=query), prompt_len).ids
    prompt_ids = torch.tensor([prompt])
    cfg_model = model.config

    def generate(n: int) -> tuple[list[float], int]:
        """Seconds from the call to each new token, and how many tokens came."""
        clock = TokenClock()
        clock.start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(prompt_ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=clock,
                                 eos_token_id=cfg_model.eos_token_id, pad_token_id=cfg_model.pad_token_id)
        return clock.token_times, out.shape[1] - prompt_ids.shape[1]

    generate(1)  # warm-up: the first call also lays lm_head out for decoding
    times, made = generate(new_tokens)
    prefill_s, total_s = times[0], times[-1]
    _, peak = rss_now()
    return {
        "bits": bits,
        "load_s": load_s,
        "rss_before_load": base_rss,
        "rss_after_load": load_rss,
        "peak_rss_load": load_peak,
        "peak_rss_train": train_peak,  # since the load began, up to the end of the training steps
        "peak_rss": peak,  # since the load began (or the whole process, when the count could not be reset)
        "peak_rss_from_load_on": exact_peak,
        "weight_bytes": weight_bytes(model),
        "train_row": {"tokens": len(row.input_ids), "prompt_tokens": row.labels.count(-100), "targets": targets},
        "step_s": step_s,
        "loss": losses,
        "prompt_tokens": len(prompt),
        "prefill_s": prefill_s,
        "generate_s": total_s,
        "new_tokens": made,
        "decode_tokens_per_s": (made - 1) / (total_s - prefill_s) if made > 1 else None,
        "tokens_per_s_with_prefill": made / total_s,
    }


# ---------------------------------------------------------------- the driver


def available_memory() -> int | None:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    found = re.search(r"MemAvailable:\s+(\d+) kB", text)
    return int(found.group(1)) * 1024 if found else None


def run_child(args: list[str]) -> dict:
    """Runs this script as a child; a Ctrl-C or error here ends the child too. Returns its last JSON line."""
    proc = subprocess.Popen([sys.executable, __file__, *args], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        out, _ = proc.communicate()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"child {' '.join(args[:3])} failed with exit status {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1])


def print_table(shape: dict, bound: int, runs: list[dict]) -> None:
    print(f"\nChatGLM-6B shape: {shape['num_layers']} layers, hidden {shape['hidden_size']}, "
          f"{shape['num_attention_heads']} heads, inner {shape['inner_hidden_size']}, vocab {shape['vocab_size']}; "
          f"bf16 weights {checkpoint_bytes(shape) / GIB:.2f} GiB; RSS bound {bound / GIB:.2f} GiB\n")
    print("| model.quantization_bit | load s | peak RSS GiB: loading | + training | + generating | within bound | "
          "train step s (1st, 2nd) | prefill s (64 tokens) | decode tokens/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        label = {0: "0 (bfloat16)", 4: "4 (NF4)", 8: "8 (int8)"}[r["bits"]]
        steps = ", ".join(f"{s:.2f}" for s in r["step_s"])
        decode = f"{r['decode_tokens_per_s']:.2f}" if r["decode_tokens_per_s"] else "-"
        print(f"| {label} | {r['load_s']:.1f} | {r['peak_rss_load'] / GIB:.2f} | {r['peak_rss_train'] / GIB:.2f} | "
              f"{r['peak_rss'] / GIB:.2f} | "
              f"{'yes' if r['peak_rss'] <= bound else 'NO'} | {steps} | {r['prefill_s']:.2f} | {decode} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=REAL["num_layers"], help="blocks (default: 28, the real model)")
    parser.add_argument("--hidden", type=int, default=REAL["hidden_size"])
    parser.add_argument("--heads", type=int, default=REAL["num_attention_heads"])
    parser.add_argument("--inner", type=int, default=REAL["inner_hidden_size"])
    parser.add_argument("--vocab", type=int, default=REAL["vocab_size"])
    parser.add_argument("--bits", type=int, nargs="+", default=[0, 4], choices=[0, 4, 8],
                        help="model.quantization_bit of each run (default: 0 and 4)")
    parser.add_argument("--pre-seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--tmpdir", default=None, help="where the temporary checkpoint goes (default: $TMPDIR)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--skip-memory-check", action="store_true",
                        help="run even when the available memory is below the expected peak")
    parser.add_argument("--child", choices=["write", "run"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = dict(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                 inner_hidden_size=args.inner, vocab_size=args.vocab)

    if args.child == "write":
        print(json.dumps({"bytes": write_checkpoint(Path(args.folder), shape)}))
        return 0
    if args.child == "run":
        result = run_one(Path(args.folder), args.bits[0], args.steps, args.new_tokens, args.pre_seq_len, 64, 64)
        print(json.dumps(result))
        return 0

    need = checkpoint_bytes(shape)
    bound = int(RSS_FACTOR * need + RSS_SLACK)
    base = Path(args.tmpdir or tempfile.gettempdir())
    if not base.is_dir():
        print(f"--tmpdir {base}: not a directory", file=sys.stderr)
        return 2
    df = subprocess.run(["df", "-h", str(base)], capture_output=True, text=True)
    print(df.stdout.strip(), file=sys.stderr)
    free = shutil.disk_usage(base).free
    if free < need * 1.02 + 256 * 2**20:
        print(f"{base}: {free / 1e9:.1f} GB free, the checkpoint needs {need / 1e9:.1f} GB (+2% and 256 MiB of "
              f"room): free some space or pass --tmpdir on a disk with room", file=sys.stderr)
        return 2
    available = available_memory()
    if available is not None and available < bound and not args.skip_memory_check:
        print(f"{available / GIB:.1f} GiB of memory available, a run may take up to {bound / GIB:.1f} GiB: run it on "
              f"a quieter machine, or pass --skip-memory-check", file=sys.stderr)
        return 2

    def stop(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    folder = Path(tempfile.mkdtemp(prefix="chatglm6b-bench-", dir=base))
    runs = []
    try:
        print(f"writing {need / GIB:.2f} GiB of float16 shards to {folder} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        run_child(["--child", "write", "--folder", str(folder), *shape_args(args)])
        write_s = time.perf_counter() - start
        print(f"wrote the checkpoint in {write_s:.0f} s", file=sys.stderr, flush=True)
        for bits in args.bits:
            print(f"measuring model.quantization_bit={bits} in a fresh process ...", file=sys.stderr, flush=True)
            runs.append(run_child(["--child", "run", "--folder", str(folder), "--bits", str(bits),
                                   "--steps", str(args.steps), "--new-tokens", str(args.new_tokens),
                                   "--pre-seq-len", str(args.pre_seq_len), *shape_args(args)]))
    except KeyboardInterrupt:
        print("interrupted: removing the temporary checkpoint", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print_table(shape, bound, runs)
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": shape, "checkpoint_bytes": need, "rss_bound": bound,
                                               "write_s": write_s, "runs": runs}, indent=2) + "\n")
    over = [r["bits"] for r in runs if r["peak_rss"] > bound]
    if over:
        print(f"peak RSS above the bound for model.quantization_bit={over}", file=sys.stderr)
        return 1
    return 0


def shape_args(args) -> list[str]:
    return ["--layers", str(args.layers), "--hidden", str(args.hidden), "--heads", str(args.heads),
            "--inner", str(args.inner), "--vocab", str(args.vocab)]


if __name__ == "__main__":
    sys.exit(main())
