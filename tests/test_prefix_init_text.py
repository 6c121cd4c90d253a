"""``model.prefix_init=text`` on transformers' decoders: the prefix is the model's own keys and values of the text
read right before the prompt, so at step 0 the model with that prefix computes what the model without one
computes on the text followed by the prompt."""

from __future__ import annotations

import pytest
import torch

from ptuning.build import load
from ptuning.config import ModelConfig
from ptuning.models import Conversation

TEXT = "hello world, how are you"


@pytest.mark.parametrize("path", ["builtin:tiny-glm4"])
def test_a_text_prefix_is_the_text_read_right_before_the_prompt(path):
    bare = load(ModelConfig(path=path), pre_seq_len=None, init=False)
    text_ids = bare.template.encode(TEXT)
    cfg = ModelConfig(path=path, pre_seq_len=len(text_ids), prefix_init="text", prefix_init_text=TEXT, prefix_dropout=0.0)
    prefixed = load(cfg)
    prompt = prefixed.template.prompt(Conversation(query="类型#裙*颜色#黑色", plain=True), 64).ids
    with torch.no_grad():
        with_prefix = prefixed.model.eval()(input_ids=torch.tensor([prompt])).logits[0]
        read_first = bare.model.eval()(input_ids=torch.tensor([text_ids + prompt])).logits[0, len(text_ids):]
    torch.testing.assert_close(with_prefix, read_first, rtol=1e-4, atol=1e-4)
