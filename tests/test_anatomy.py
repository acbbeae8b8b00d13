"""The anatomy map places every parameter of common architectures in the right slot."""

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    DistilBertConfig,
    GPT2Config,
    LlamaConfig,
    MPNetConfig,
    Qwen2Config,
    RobertaConfig,
)

from hybridtune.model.anatomy import Anatomy

SMALL = dict(vocab_size=100, num_labels=3)
CONFIGS = {
    "bert": BertConfig(
        hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32, **SMALL
    ),
    "roberta": RobertaConfig(
        hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32, **SMALL
    ),
    "distilbert": DistilBertConfig(dim=16, n_layers=3, n_heads=2, hidden_dim=32, **SMALL),
    "mpnet": MPNetConfig(
        hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32, **SMALL
    ),
    "gpt2": GPT2Config(n_embd=16, n_layer=3, n_head=2, pad_token_id=0, **SMALL),
    "llama": LlamaConfig(
        hidden_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
        pad_token_id=0,
        **SMALL,
    ),
    "qwen2": Qwen2Config(
        hidden_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
        pad_token_id=0,
        **SMALL,
    ),
}
# (a parameter name, its expected slot) per architecture
EXPECTED = {
    "bert": [
        ("bert.embeddings.word_embeddings.weight", "embeddings"),
        ("bert.embeddings.LayerNorm.weight", "embeddings"),
        ("bert.encoder.layer.2.output.dense.weight", "block.2"),
        ("bert.pooler.dense.weight", "head"),
        ("classifier.weight", "head"),
    ],
    "roberta": [
        ("roberta.encoder.layer.0.attention.self.query.weight", "block.0"),
        ("classifier.out_proj.weight", "head"),
    ],
    "distilbert": [
        ("distilbert.embeddings.position_embeddings.weight", "embeddings"),
        ("distilbert.transformer.layer.1.ffn.lin1.weight", "block.1"),
        ("pre_classifier.weight", "head"),
    ],
    "mpnet": [
        ("mpnet.encoder.layer.2.attention.attn.q.weight", "block.2"),
        ("mpnet.encoder.relative_attention_bias.weight", "embeddings"),
        ("classifier.dense.weight", "head"),
    ],
    "gpt2": [
        ("transformer.wte.weight", "embeddings"),
        ("transformer.h.1.mlp.c_fc.weight", "block.1"),
        ("transformer.ln_f.weight", "final_norm"),
        ("score.weight", "head"),
    ],
    "llama": [
        ("model.embed_tokens.weight", "embeddings"),
        ("model.layers.2.self_attn.q_proj.weight", "block.2"),
        ("model.norm.weight", "final_norm"),
        ("score.weight", "head"),
    ],
    "qwen2": [("model.layers.0.mlp.up_proj.weight", "block.0"), ("model.norm.weight", "final_norm")],
}


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_anatomy_places_parameters(arch):
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(CONFIGS[arch])
    anatomy = Anatomy.of(model)
    assert anatomy.num_blocks == 3
    names = dict(model.named_parameters())
    for name, slot in EXPECTED[arch]:
        assert name in names, name
        assert anatomy.slot_of(name) == slot, (name, anatomy.slot_of(name))
    # every parameter lands in a known slot, and every block has parameters
    slots = {anatomy.slot_of(n) for n in names}
    assert slots <= set(anatomy.slots)
    assert {f"block.{i}" for i in range(3)} <= slots


def test_anatomy_survives_peft_wrapping():
    from peft import LoraConfig, get_peft_model

    model = AutoModelForSequenceClassification.from_config(CONFIGS["bert"])
    anatomy = Anatomy.of(model)
    wrapped = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"]))
    slots = {n: anatomy.slot_of(n) for n, _ in wrapped.named_parameters()}
    lora = [n for n in slots if "lora_A" in n]
    assert lora and all(slots[n].startswith("block.") for n in lora)
    assert slots["base_model.model.classifier.modules_to_save.default.weight"] == "head"
