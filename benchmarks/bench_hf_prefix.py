"""Step time of transformers' own decoders with the P-Tuning v2 prefix vs the same step without one (P = 0).

    python benchmarks/bench_hf_prefix.py                     # CPU, the bench shape, float32
    python benchmarks/bench_hf_prefix.py --device cuda --real --dtype bfloat16   # the real sizes, random weights

The bench shape (``ptuning.perf.BENCH_SHAPE``): hidden 512, 8 heads, 4 layers, intermediate 2048, vocab 32000,
prefix 32, here with 2 key/value heads (grouped-query, as every listed model) and head size 64; random weights,
frozen backbone. ``--real`` builds each architecture at its published size (config values in :data:`REAL`)
with a prefix of 128. A step is forward + backward + AdamW on the prefix for a batch of 4 x 256 tokens
(128 prompt, 128 targets), as the training loop runs it (``loss_reduction="sum"``, logits only at targets).
The P = 0 step backpropagates to the input embeddings instead (the same backward through every layer; a
frozen model without prefix would have nothing to train). The two steps alternate in one process so that a
busy machine slows both alike; the table gives the median of each and their ratio.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ptuning.perf import BENCH_SHAPE  # noqa: E402

ARCHITECTURES = ("GlmForCausalLM", "Glm4ForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
BENCH = dict(vocab_size=BENCH_SHAPE["vocab_size"], hidden_size=BENCH_SHAPE["hidden_size"],
             num_attention_heads=BENCH_SHAPE["num_attention_heads"], num_hidden_layers=BENCH_SHAPE["num_layers"],
             intermediate_size=BENCH_SHAPE["inner_hidden_size"], num_key_value_heads=2, head_dim=64)
# published config.json sizes (THUDM/glm-4-9b-chat-hf, THUDM/GLM-4-9B-0414, meta-llama/Llama-3.1-8B,
# Qwen/Qwen2.5-7B, Qwen/Qwen3-8B)
REAL = {
    "GlmForCausalLM": dict(vocab_size=151552, hidden_size=4096, intermediate_size=13696, num_hidden_layers=40,
                           num_attention_heads=32, num_key_value_heads=2, head_dim=128),
    "Glm4ForCausalLM": dict(vocab_size=151552, hidden_size=4096, intermediate_size=13696, num_hidden_layers=40,
                            num_attention_heads=32, num_key_value_heads=2, head_dim=128),
    "LlamaForCausalLM": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, head_dim=128),
    "Qwen2ForCausalLM": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                             num_attention_heads=28, num_key_value_heads=4, head_dim=128),
    "Qwen3ForCausalLM": dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                             num_attention_heads=32, num_key_value_heads=8, head_dim=128),
}


def build(arch: str, sizes: dict, prefix: int, device: str, dtype):
    import torch
    import transformers

    from ptuning.models.hf import attach_prefix, prefix_shape
    from ptuning.prefix import mark_only_prefix_trainable

    config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    config = config_cls(**sizes, max_position_embeddings=4096, pad_token_id=0, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = getattr(transformers, arch)(config).to(dtype)
    attach_prefix(model, prefix_shape(config, prefix) if prefix else None)
    if prefix:
        mark_only_prefix_trainable(model)
    else:
        model.requires_grad_(False)
    return model.train()


def measure(arch: str, sizes: dict, prefix: int, device: str, dtype, steps: int, batch: int, seq: int) -> dict:
    import torch

    with_prefix = build(arch, sizes, prefix, device, dtype)
    without = build(arch, sizes, 0, device, dtype)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, sizes["vocab_size"], (batch, seq), generator=g).to(device)
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    optimizer = torch.optim.AdamW(with_prefix.prefix_encoder.parameters(), lr=1e-3)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def step_prefix():
        with_prefix(input_ids=ids, labels=labels, loss_reduction="sum", return_logits=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def step_plain():
        embeds = without.get_input_embeddings()(ids).detach().requires_grad_()
        without(inputs_embeds=embeds, labels=labels, loss_reduction="sum", return_logits=False).loss.backward()

    times = {"prefix": [], "plain": []}
    for i in range(steps + 1):
        for name, step in (("prefix", step_prefix), ("plain", step_plain)):
            sync()
            start = time.perf_counter()
            step()
            sync()
            if i:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    prefix_s, plain_s = statistics.median(times["prefix"]), statistics.median(times["plain"])
    return {"arch": arch, "prefix_s": prefix_s, "plain_s": plain_s, "ratio": prefix_s / plain_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--real", action="store_true", help="the published sizes, prefix 128 (needs a large GPU)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--arch", nargs="*", default=list(ARCHITECTURES))
    args = parser.parse_args()

    import torch

    dtype = getattr(torch, args.dtype)
    prefix = 128 if args.real else BENCH_SHAPE["pre_seq_len"]
    rows = []
    for arch in args.arch:
        rows.append(measure(arch, REAL[arch] if args.real else BENCH, prefix, args.device, dtype, args.steps,
                            args.batch, args.seq))
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()
    print(f"{where}, {args.dtype}, {'published sizes' if args.real else 'bench shape'}, P={prefix}, "
          f"batch {args.batch} x {args.seq}, median of {args.steps} alternating steps, torch {torch.__version__}")
    print("| architecture | step with prefix (s) | step with P = 0 (s) | ratio |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['arch']} | {r['prefix_s']:.4f} | {r['plain_s']:.4f} | {r['ratio']:.3f} |")


if __name__ == "__main__":
    main()
