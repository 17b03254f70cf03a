"""Shared helpers: tiny random HF models, tokenizers, parquet writers. Everything runs on CPU in
fp32."""

import atexit
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# public tokenizers and data sets for realistic checks, if this machine has them (never committed:
# set SHARED_DATA to their folder); the tests that need them skip without them
SHARED_DATA = os.environ.get("SHARED_DATA", os.path.join(ROOT, "..", "shared", "data"))


def tiny_model(arch="qwen3", vocab_size=128, attn="sdpa", seed=0, **overrides):
    """A 2-layer random causal LM (fp32, eval mode). Weights drawn wide (std 0.3) so that greedy
    decoding wanders over the vocabulary instead of repeating one token, which would make decoding
    tests easy.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config
    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.3)
    common.update(overrides)
    config = Qwen3Config(head_dim=16, tie_word_embeddings=True, **common) if arch == "qwen3" \
        else LlamaConfig(tie_word_embeddings=False, **common)
    model = AutoModelForCausalLM.from_config(
        copy.deepcopy(config), attn_implementation=attn, dtype=torch.float32)
    return model.eval()


# ---------------- tokenizers with the chat templates of many families

FAMILIES = {  # template file: (special tokens, plain added tokens, bos, eos)
    "qwen2.5": (
        ["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
        ["<tool_call>", "</tool_call>"],
        None,
        "<|im_end|>"),
    "qwen3": (
        ["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
        [
            "<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>",
            "</tool_response>"],
        None,
        "<|im_end|>"),
    "qwq": (
        ["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
        ["<think>", "</think>", "<tool_call>", "</tool_call>"],
        None,
        "<|im_end|>"),
    "deepseek-r1-distill-qwen": (
        ["<｜User｜>", "<｜Assistant｜>"],
        [
            "<think>", "</think>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>",
            "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>", "<｜tool▁outputs▁begin｜>",
            "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"],
        "<｜begin▁of▁sentence｜>",
        "<｜end▁of▁sentence｜>"),
    "deepseek-v3.1": (
        ["<｜User｜>", "<｜Assistant｜>"],
        [
            "<think>", "</think>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>",
            "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>", "<｜tool▁output▁begin｜>",
            "<｜tool▁output▁end｜>"],
        "<｜begin▁of▁sentence｜>",
        "<｜end▁of▁sentence｜>"),
    "llama-3.1": (
        ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"],
        [],
        "<|begin_of_text|>",
        "<|eot_id|>"),
    "gemma-2": (["<start_of_turn>", "<end_of_turn>"], [], "<bos>", "<eos>"),
    "mistral-nemo": (
        [
            "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
            "[TOOL_RESULTS]", "[/TOOL_RESULTS]"],
        [],
        "<s>",
        "</s>"),
    "phi-3.5-mini": (
        ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        [],
        None,
        "<|endoftext|>"),
    "command-r7b": (
        [
            "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|USER_TOKEN|>",
            "<|CHATBOT_TOKEN|>", "<|SYSTEM_TOKEN|>", "<|START_RESPONSE|>", "<|END_RESPONSE|>",
            "<|START_THINKING|>", "<|END_THINKING|>", "<|START_ACTION|>", "<|END_ACTION|>",
            "<|START_TOOL_RESULT|>", "<|END_TOOL_RESULT|>"],
        [],
        "<BOS_TOKEN>",
        "<|END_OF_TURN_TOKEN|>"),
    "gpt-oss": (
        [
            "<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>",
            "<|constrain|>"],
        [],
        "<|startoftext|>",
        "<|return|>"),
    "apriel-1.5": (
        ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|content|>", "<|tool_result|>"],
        [],
        "<s>",
        "</s>")}


def byte_tokenizer(name):
    """A byte-level tokenizer (every byte a token: any text round-trips) with a model family's
    special tokens and its chat template from tests/fixtures/templates: real templates without a
    download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast
    specials, plain, bos, eos = FAMILIES[name]
    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    with open(os.path.join(ROOT, "tests", "fixtures", "templates", f"{name}.jinja")) as f:
        template = f.read()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos,
                                  additional_special_tokens=specials, chat_template=template)
    tok.add_tokens(plain)
    return tok


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
    """The demo, shortened: a small model trained briefly with train.py on the synthetic data (CPU,
    ~30 s)."""
    import subprocess
    from demo import write_demo_data
    root = tmp_path_factory.mktemp("demo")
    files = write_demo_data(str(root / "data"), n_train=800, n_test=40)
    steps = 150
    cmd = [
        sys.executable,
        "train.py",
        "--device=cpu",
        f"--out_dir={root}/out",
        f"--train_files={files['train']}",
        f"--data_cache={root}/cache",
        f"--val_files={files['test']}",
        "--demo_data=False",
        "--n_layer=2",
        "--n_embd=64",
        f"--max_steps={steps}",
        "--batch_size=8",
        "--log_every=50"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return {"out_dir": str(root / "out"), "test": files["test"], "steps": steps, "stdout": p.stdout}


def example(prompt, response, block_size, mask_token_id, layout="split", block_offset=0):
    """The training row of a prompt/response sample (build_example takes the whole sample and its
    spans)."""
    from data import build_example
    return build_example(
        list(prompt) + list(response),
        [(len(prompt), len(prompt) + len(response))],
        block_size,
        mask_token_id,
        layout,
        block_offset)


# ---------------- train.py as a user runs it

# tokenized data of every test run, kept apart
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
DATA_CACHE = tempfile.mkdtemp(prefix="next-block-cache-")  # removed when the session ends
TINY = [
    "--device=cpu",
    "--init_from=demo",
    f"--data_cache={DATA_CACHE}",
    "--n_layer=2",
    "--n_embd=32",
    "--n_head=2",
    "--max_length=128",
    "--demo_data=False",
    "--val_files=None",
    "--log_every=1",
    "--learning_rate=3e-3",
    "--min_lr=3e-4",
    "--warmup_ratio=0.1"]


@pytest.fixture(scope="session")
def train_file(tmp_path_factory):
    from demo import write_demo_data
    return write_demo_data(str(tmp_path_factory.mktemp("data")), n_train=96, n_test=16)["train"]


class ForkServer:
    """tests/forkrun.py: `python script args`, forked from a process that imported torch and
    transformers once (seconds saved per run). One request at a time; thread-safe."""

    def __init__(self, env=None):
        env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "forkrun.py")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env)
        self.dir, self.lock = tempfile.mkdtemp(prefix="forkrun-"), threading.Lock()

    def run(self, script, args, env=None, timeout=600):
        """Like subprocess.run([python, script, *args], capture_output=True, text=True)."""
        out, err = os.path.join(self.dir, "out"), os.path.join(self.dir, "err")
        request = {"script": script, "args": [str(a) for a in args], "env": env or {},
                   "out": out, "err": err, "timeout": timeout}
        with self.lock:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            code = int(self.proc.stdout.readline())
            with open(out) as o, open(err) as e:
                return subprocess.CompletedProcess([script, *args], code, o.read(), e.read())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()
        self.proc.stdout.close()
        shutil.rmtree(self.dir, ignore_errors=True)


_SERVER = []  # the session's ForkServer, started on first use


def python(script, *args, env=None):
    """`python script args` in ROOT (forked: see ForkServer), a CompletedProcess."""
    if not _SERVER:
        _SERVER.append(ForkServer())
        atexit.register(_SERVER[0].close)
    return _SERVER[0].run(script, args, env)


def train(out_dir, *args, check=True, launcher=None, env=None, train_files=None):
    data_arg = [f"--train_files={train_files}"] if train_files else []
    argv = TINY + [f"--out_dir={out_dir}"] + data_arg + list(args)
    if launcher is None:
        p = python("train.py", *argv, env=env)
    else:
        run_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
        p = subprocess.run(launcher + ["train.py"] + argv, cwd=ROOT, capture_output=True,
                           text=True, env=run_env, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(
            f"train.py failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def start(out_dir, args, launcher=None):
    cmd = [*(launcher or [sys.executable]), "train.py", *TINY, f"--out_dir={out_dir}", *args]
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"))


def read_json(path):
    with open(path) as f:
        return json.load(f)


def jsonl(path):
    """The rows of a JSON-lines file (metrics.jsonl, samples.jsonl)."""
    with open(path) as f:
        return [json.loads(line) for line in f]


def losses(out_dir):
    """{step: loss} from metrics.jsonl; the last row of a step wins (a resumed run logs its steps
    again)."""
    rows = jsonl(os.path.join(out_dir, "metrics.jsonl"))
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(DATA_CACHE, ignore_errors=True)
