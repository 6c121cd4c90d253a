"""Builds the built-in small model of the transformers family, ``data/tiny-glm4``: a GLM-4-0414
architecture (``Glm4ForCausalLM``: grouped-query attention with 2 key/value heads, partial rotary, q/k/v
biases, fused gate_up MLP, sandwich norms) of hidden size 128 and 4 layers, with a byte-level BPE tokenizer
(``tokenizer.json``) and a GLM-4-style chat template (``[gMASK]<sop><|user|>\\n...<|assistant|>\\n...``),
pretrained (all weights) on the bundled sample.

Like ``data/tiny-chatglm`` (see ``make_tiny_model.py``) it is a *chat* model: given an ADGEN attribute string
(``类型#上衣*材质#棉*...``), plain or in a chat turn, it writes the ad wrapped in a chatty opening and closing
(``好的，为您写一段广告文案：... 希望您喜欢！``); for a plain list of values (``上衣，棉``) it writes the bare ad.
P-Tuning v2 then has real work to do: the prefix teaches the frozen model ADGEN's concise answers. The rows
are rendered by the family's own prompt template (:class:`ptuning.models.hf.template.ChatTemplatePrompt`),
exactly as training and evaluation render them.

The tokenizer is trained here with the ``tokenizers`` library on the sample's text (byte-level BPE, so any
text round-trips); the special tokens come after the learned vocabulary, as in the real GLM-4 tokenizer.
Deterministic (seeded; single-threaded tokenizer training). Run from the repository root:
``python data/make_tiny_glm4.py`` (about 15 CPU-minutes: 7 minutes on 2 idle cores). It writes ``config.json``,
``generation_config.json``, ``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json`` and
``chat_template.jinja``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # tokenizers' trainer: one thread, one merge order

import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import Glm4Config, Glm4ForCausalLM, PreTrainedTokenizerFast  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ptuning.models.base import Conversation  # noqa: E402
from ptuning.models.hf.template import ChatTemplatePrompt  # noqa: E402

OUT = ROOT / "data" / "tiny-glm4"
SEED = 1234
STEPS = 800
BATCH = 16
LR = 2e-3
LEARNED_VOCAB = 1500
SPECIAL_TOKENS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                  "<|assistant|>", "<|observation|>"]
STOP_TOKENS = ["<|endoftext|>", "<|user|>", "<|observation|>"]  # as GLM-4's generation_config.json
CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'observation'] %}"
    "{{- raise_exception('unknown role ' + message['role']) }}"
    "{%- endif %}"
    "{{- '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}{%- endif %}"
)
OPENINGS = ["好的，为您写一段广告文案：", "没问题！这是为这件商品写的文案：", "当然可以，文案如下：", "根据您给出的属性，文案是："]
CLOSINGS = ["希望您喜欢！如需修改请告诉我。", "这段文案突出了商品的特点，欢迎继续提问。", "如果需要更多版本，我可以再写几段。"]
SYSTEMS = ["你是一个乐于助人的助手。", "你是一名服装文案写手。"]
MAX_SOURCE, MAX_TARGET = 64, 96


def read_rows() -> list[dict]:
    with open(ROOT / "data" / "adgen_sample" / "train.json", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def values_text(content: str) -> str:
    """``类型#上衣*材质#棉`` -> ``上衣，棉``: the attribute values alone."""
    return "，".join(part.split("#", 1)[1] for part in content.split("*") if "#" in part)


def train_tokenizer(rows: list[dict]) -> PreTrainedTokenizerFast:
    """Byte-level BPE of ``LEARNED_VOCAB`` entries on the sample, then GLM-4's special tokens."""
    texts = [row["content"] for row in rows] + [row["summary"] for row in rows] + OPENINGS + CLOSINGS + SYSTEMS
    texts += [values_text(row["content"]) for row in rows]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=LEARNED_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    # a text alone starts with [gMASK]<sop>, as GLM-4's tokenizer
    ids = {token: tokenizer.token_to_id(token) for token in ("[gMASK]", "<sop>")}
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[gMASK] <sop> $A", pair="[gMASK] <sop> $A $B", special_tokens=list(ids.items())
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>", padding_side="left",
        clean_up_tokenization_spaces=False, model_max_length=512,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t != "<|endoftext|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def examples(template: ChatTemplatePrompt, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
    """Chatty answers to attribute strings (plain and in chat turns), bare ads for plain value lists."""
    g = torch.Generator().manual_seed(SEED)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    out = []
    for i, row in enumerate(rows):
        chatty = pick(OPENINGS) + row["summary"] + pick(CLOSINGS)
        for conversation in (
            Conversation(query=row["content"], plain=True),
            Conversation(query=row["content"], system=pick(SYSTEMS) if i % 3 == 0 else None,
                         history=[(rows[i - 1]["content"], rows[i - 1]["summary"])] if i % 4 == 1 else ()),
        ):
            r = template.train_row(conversation, chatty, MAX_SOURCE, MAX_TARGET)
            out.append((r.input_ids, r.labels))
        r = template.train_row(Conversation(query=values_text(row["content"]), plain=True), row["summary"],
                               MAX_SOURCE, MAX_TARGET)
        out.append((r.input_ids, r.labels))
    return out


def main() -> None:
    torch.manual_seed(SEED)
    rows = read_rows()
    tokenizer = train_tokenizer(rows)
    stops = [tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS]
    template = ChatTemplatePrompt(tokenizer, stops)
    config = Glm4Config(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
        rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=stops, bos_token_id=None, dtype="float32",
    )
    model = Glm4ForCausalLM(config)
    model.generation_config.eos_token_id = stops
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    data = examples(template, rows)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 100) * (1 - s / STEPS))
    g = torch.Generator().manual_seed(SEED)
    model.train()
    start = time.time()
    for step in range(STEPS):
        batch = [data[i] for i in torch.randint(0, len(data), (BATCH,), generator=g).tolist()]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
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
    model.eval().save_pretrained(OUT)
    tokenizer.save_pretrained(str(OUT))
    print(f"wrote {OUT} ({sum(p.numel() for p in model.parameters()):,} parameters, {len(tokenizer)} tokens)")


if __name__ == "__main__":
    main()
