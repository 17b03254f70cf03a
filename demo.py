"""
demo.py: the embedded CPU demo, built from code (nothing is downloaded): a character tokenizer with
a chat template, a tiny Qwen3, and a synthetic reasoning data set (add two 3-digit numbers column by
column, the work in a <think> block). `python train.py` with no arguments trains it.
"""

import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config

SPECIAL = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<think>",
           "</think>"]
# Phi-3 style turns; the generation prompt opens a <think> block, as the R1 distills' does
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n<think>\n{% endif %}")


def demo_tokenizer():
    """Printable ASCII and newline, one token each, plus special tokens for the chat turns and the
    think block. Its generation prompt ends with `<think>\\n`."""
    chars = ["<|unk|>", "\n"] + [chr(c) for c in range(32, 127)]
    backend = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="<|unk|>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<|unk|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>", additional_special_tokens=SPECIAL[1:],
        chat_template=CHAT_TEMPLATE, model_max_length=1 << 30)


def demo_config(vocab_size=128, hidden_size=128, num_layers=4, num_heads=4, **overrides):
    """A tiny Qwen3 (RMSNorm, RoPE, GQA, tied embeddings): the code paths of the real ones."""
    kwargs = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                  num_hidden_layers=num_layers, num_attention_heads=num_heads,
                  num_key_value_heads=max(1, num_heads // 2), head_dim=hidden_size // num_heads,
                  max_position_embeddings=4096, tie_word_embeddings=True, rope_theta=10000.0)
    kwargs.update(overrides)
    return Qwen3Config(**kwargs)


def demo_problem(rng):
    """Add two 3-digit numbers as taught in school: one line per column, named u(nits), t(ens),
    h(undreds), each `digit+digit+carry=two-digit sum`, then the answer."""
    a, b = rng.randint(100, 999), rng.randint(100, 999)
    steps, carry, answer = [], 0, ""
    for column, da, db in zip("uth", str(a)[::-1], str(b)[::-1]):
        total = int(da) + int(db) + carry
        steps.append(f"{column}:{da}+{db}+{carry}={total:02d}")
        answer, carry = str(total % 10) + answer, total // 10
    answer = (str(carry) if carry else "") + answer
    return (f"What is {a}+{b}?",
            "<think>\n" + "\n".join(steps) + "\n</think>\nThe answer is " + answer + ".")


def write_demo_data(out_dir, n_train=3600, n_test=200, seed=0):
    """train.parquet and test.parquet (chat-list prompt/target columns) in out_dir, the same every
    time; no test problem occurs in train. Files already there are kept."""
    paths = {split: os.path.join(out_dir, f"{split}.parquet") for split in ("train", "test")}
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    os.makedirs(out_dir, exist_ok=True)
    rng, seen = random.Random(seed), set()
    rows = {"test": [], "train": []}
    for split, count in (("test", n_test), ("train", n_train)):
        while len(rows[split]) < count:
            question, target = demo_problem(rng)
            if question in seen:
                continue
            seen.add(question)
            rows[split].append({"prompt": [{"role": "user", "content": question}],
                                "target": [{"role": "assistant", "content": target}]})
    for split, path in paths.items():
        pq.write_table(pa.Table.from_pylist(rows[split]), path + ".tmp")
        os.replace(path + ".tmp", path)
    return paths
