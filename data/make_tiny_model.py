"""Builds the built-in backbone ``data/tiny-chatglm``: a ChatGLM-6B-architecture model of hidden size 128,
4 layers, pretrained (all weights) on the bundled sample.

Like the real ChatGLM-6B before P-Tuning on ADGEN, the backbone is a *chat* model: asked with an ADGEN
attribute string (``类型#上衣*材质#棉*...``) it writes the ad wrapped in a chatty opening and closing
(``好的，为您写一段广告文案：... 希望您喜欢！``), so its untuned answers score poorly against ADGEN's bare
summaries. It also knows bare ad copy, which it writes for a plain list of values (``上衣，棉``). P-Tuning
v2 then has real work to do: the prefix teaches the frozen model to answer ADGEN prompts in the task's
concise format, without the chat wrapping.

Deterministic (seeded). Run from the repository root: ``python data/make_tiny_model.py`` (about 2 minutes
on 2 CPU cores). It writes ``config.json``, ``model.safetensors`` and the tokenizer files.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ptuning.models.chatglm import ChatGLMForConditionalGeneration, tiny_config  # noqa: E402
from ptuning.models.chatglm.tokenizer import ChatGLMTokenizer  # noqa: E402

OUT = ROOT / "data" / "tiny-chatglm"
SEED = 1234
STEPS = 800
BATCH = 16
LR = 2e-3
OPENINGS = ["好的，为您写一段广告文案：", "没问题！这是为这件商品写的文案：", "当然可以，文案如下：", "根据您给出的属性，文案是："]
CLOSINGS = ["希望您喜欢！如需修改请告诉我。", "这段文案突出了商品的特点，欢迎继续提问。", "如果需要更多版本，我可以再写几段。"]


def example(tokenizer: ChatGLMTokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """``prompt [gMASK] <sop> answer <eop>`` and its labels (-100 over the prompt)."""
    a = tokenizer.encode(prompt, add_special_tokens=False)[:62]
    b = tokenizer.encode(answer, add_special_tokens=False)[:126]
    ids = tokenizer.build_inputs_with_special_tokens(a, b)
    return ids, [-100] * (len(a) + 1) + ids[len(a) + 1:]


def values_text(content: str) -> str:
    """``类型#上衣*材质#棉`` -> ``上衣，棉``: the attribute values alone."""
    return "，".join(part.split("#", 1)[1] for part in content.split("*") if "#" in part)


def examples(tokenizer: ChatGLMTokenizer) -> list[tuple[list[int], list[int]]]:
    rows = [json.loads(line) for line in open(ROOT / "data" / "adgen_sample" / "train.json", encoding="utf-8")]
    g = torch.Generator().manual_seed(SEED)
    out = []
    for row in rows:
        opening = OPENINGS[int(torch.randint(len(OPENINGS), (1,), generator=g))]
        closing = CLOSINGS[int(torch.randint(len(CLOSINGS), (1,), generator=g))]
        out.append(example(tokenizer, row["content"], opening + row["summary"] + closing))
        out.append(example(tokenizer, values_text(row["content"]), row["summary"]))
    return out


def main() -> None:
    torch.manual_seed(SEED)
    tokenizer = ChatGLMTokenizer.from_pretrained(str(ROOT / "data" / "tokenizer"))
    config = tiny_config(hidden_size=128, num_layers=4, num_attention_heads=4, inner_hidden_size=512,
                         vocab_size=1000)
    assert len(tokenizer) <= config.vocab_size
    model = ChatGLMForConditionalGeneration(config)
    data = examples(tokenizer)
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
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - start:.0f}s", flush=True)
    if OUT.exists():
        shutil.rmtree(OUT)
    model.save_pretrained(OUT)
    tokenizer.save_pretrained(str(OUT))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
