"""Shared helpers: tiny random HF models, tokenizers, parquet writers. Everything runs on CPU in fp32."""
import copy
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# real tokenizers for realistic checks live beside the project (never committed); tests skip without them
SHARED_DATA = os.environ.get("SHARED_DATA", os.path.join(ROOT, "..", "shared", "data"))


def tiny_model(arch="qwen3", vocab_size=128, attn="sdpa", seed=0, **overrides):
    """A 2-layer random causal LM (fp32, eval mode)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    common.update(overrides)
    config = Qwen3Config(head_dim=16, tie_word_embeddings=True, **common) if arch == "qwen3" \
        else LlamaConfig(tie_word_embeddings=False, **common)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=attn, dtype=torch.float32)
    return model.eval()


def shared_tokenizer(name):
    path = os.path.join(SHARED_DATA, "tokenizers", name)
    if not os.path.isdir(path):
        pytest.skip(f"{path} not present")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)
