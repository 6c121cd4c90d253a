"""Builds the built-in ChatGLM2/3-layout backbones ``data/tiny-chatglm2`` and ``data/tiny-chatglm3``: the
ChatGLM2-6B architecture (RMSNorm, 2 key/value groups, rotary on half of each head, SwiGLU) at hidden size
128, 4 layers, pretrained (all weights) on the bundled sample, written as original folders (``config.json``
with the original keys, ``model.safetensors`` with the original weight keys, ``tokenizer.model``).

Like ``data/tiny-chatglm`` (see ``make_tiny_model.py``) each is a *chat* model: asked in its own chat format
(ChatGLM2's ``[Round 1]`` prompt, ChatGLM3's ``<|user|>`` turn) with an ADGEN attribute string it wraps the
ad in a chatty opening and closing, so its untuned answers score poorly against ADGEN's bare summaries; it
also knows the bare ad copy, which it writes for a plain list of the values. P-Tuning v2 then teaches the
frozen model the task's concise format.

Deterministic (seeded). Run from the repository root after ``data/make_chatglm2_tokenizer.py``:
``python data/make_tiny_chatglm2.py`` (both; a few minutes each on 2 CPU cores) or ``--version 2``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import GlmForCausalLM

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ptuning.models.base import Conversation  # noqa: E402
from ptuning.models.chatglm2.config import parse_original_config  # noqa: E402
from ptuning.models.chatglm2.family import rotary_for  # noqa: E402
from ptuning.models.chatglm2.template import ChatGLM2Template, ChatGLM3Template  # noqa: E402
from ptuning.models.chatglm2.tokenizer import ChatGLM2Tokenizer  # noqa: E402
from ptuning.models.chatglm2.weights import save_original  # noqa: E402

SEED = 1234
STEPS = 800
BATCH = 16
LR = 2e-3
OPENINGS = ["好的，为您写一段广告文案：", "没问题！这是为这件商品写的文案：", "当然可以，文案如下：", "根据您给出的属性，文案是："]
CLOSINGS = ["希望您喜欢！如需修改请告诉我。", "这段文案突出了商品的特点，欢迎继续提问。", "如果需要更多版本，我可以再写几段。"]
CONFIG = {
    "architectures": ["ChatGLMModel"],
    "model_type": "chatglm",
    "num_layers": 4,
    "hidden_size": 128,
    "ffn_hidden_size": 352,
    "kv_channels": 32,
    "num_attention_heads": 4,
    "multi_query_attention": True,
    "multi_query_group_num": 2,
    "padded_vocab_size": 1024,
    "seq_length": 512,
    "layernorm_epsilon": 1e-5,
    "rmsnorm": True,
    "add_qkv_bias": True,
    "add_bias_linear": False,
    "post_layer_norm": True,
    "torch_dtype": "float32",
    "eos_token_id": 2,
    "pad_token_id": 0,
}


def values_text(content: str) -> str:
    """``类型#上衣*材质#棉`` -> ``上衣，棉``: the attribute values alone."""
    return "，".join(part.split("#", 1)[1] for part in content.split("*") if "#" in part)


def examples(template) -> list[tuple[list[int], list[int]]]:
    rows = [json.loads(line) for line in open(ROOT / "data" / "adgen_sample" / "train.json", encoding="utf-8")]
    g = torch.Generator().manual_seed(SEED)
    out = []
    for row in rows:
        opening = OPENINGS[int(torch.randint(len(OPENINGS), (1,), generator=g))]
        closing = CLOSINGS[int(torch.randint(len(CLOSINGS), (1,), generator=g))]
        for prompt, answer in ((row["content"], opening + row["summary"] + closing),
                               (values_text(row["content"]), row["summary"])):
            built = template.train_row(Conversation(prompt), answer, 64, 128)
            out.append((built.input_ids, built.labels))
    return out


def build(version: int) -> Path:
    torch.manual_seed(SEED)
    out = ROOT / "data" / f"tiny-chatglm{version}"
    tokenizer = ChatGLM2Tokenizer.from_pretrained(ROOT / "data" / f"tokenizer-chatglm{version}")
    original = parse_original_config({**CONFIG, "chatglm_version": version}, Path("config.json"), version)
    config = original.glm_config()
    assert len(tokenizer) <= config.vocab_size
    model = GlmForCausalLM(config)
    model.model.rotary_emb = rotary_for(config)
    template = ChatGLM3Template(tokenizer) if version == 3 else ChatGLM2Template(tokenizer)
    data = examples(template)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 100) * (1 - s / STEPS))
    g = torch.Generator().manual_seed(SEED)
    model.train()
    start = time.time()
    for step in range(STEPS):
        rows = [data[i] for i in torch.randint(0, len(data), (BATCH,), generator=g).tolist()]
        width = max(len(r[0]) for r in rows)
        ids = torch.tensor([r[0] + [tokenizer.pad_token_id] * (width - len(r[0])) for r in rows])
        labels = torch.tensor([r[1] + [-100] * (width - len(r[1])) for r in rows])
        loss = model(ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == STEPS - 1:
            print(f"chatglm{version} step {step:5d}  loss {loss.item():.4f}  {time.time() - start:.0f}s", flush=True)
    if out.exists():
        shutil.rmtree(out)
    model.config.pre_seq_len = None
    save_original(model.eval(), out, dtype=torch.float32, safe=True, max_shard_bytes=None, with_prefix=False,
                  tokenizer=tokenizer)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", type=int, choices=(2, 3), action="append", help="2 and/or 3 (default both)")
    args = parser.parse_args(argv)
    for version in args.version or [2, 3]:
        print(f"wrote {build(version)}")


if __name__ == "__main__":
    main()
