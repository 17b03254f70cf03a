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
    """A 2-layer random causal LM (fp32, eval mode). Weights drawn wide (std 0.3) so that greedy decoding
    wanders over the vocabulary instead of repeating one token, which would make decoding tests easy."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.3)
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


@pytest.fixture(scope="session")
def trained_demo(tmp_path_factory):
    """The demo, shortened: a small model trained briefly with train.py on the synthetic data (CPU, ~30 s)."""
    import subprocess
    from data import write_demo_data
    root = tmp_path_factory.mktemp("demo")
    files = write_demo_data(str(root / "data"), n_train=800, n_test=40)
    steps = 150
    cmd = [sys.executable, "train.py", "--device=cpu", f"--out_dir={root}/out", f"--train_files={files['train']}",
           f"--val_files={files['test']}", "--demo_data=False", "--n_layer=2", "--n_embd=64", f"--max_steps={steps}",
           "--batch_size=8", "--log_every=50"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return {"out_dir": str(root / "out"), "test": files["test"], "steps": steps, "stdout": p.stdout}
