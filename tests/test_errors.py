"""Every user mistake we know of, in train.py, sample.py and bench.py: one line on stderr (`error:
...`), exit code 1, no traceback, nothing slow done first. `python tests/test_errors.py` prints the
table that docs/errors.md shows (from real runs)."""

import os
import sys

import pytest
from concurrent.futures import ThreadPoolExecutor

from conftest import ROOT, TINY, ForkServer, tiny_model, write_parquet

pytestmark = pytest.mark.slow  # the scripts, run as processes


TRAIN = [  # (what the user got wrong, arguments, the message that must name it)
    (
        "a config key typo",
        ["--batch_sise=2"],
        "unknown config key 'batch_sise' (did you mean batch_size"),
    (
        "a value of the wrong type",
        ["--max_steps=two"],
        "--max_steps: expected int, got 'two' (str)"),
    (
        "a value of the wrong type in a config file",
        ["{tmp}/bad_type.py"],
        "bad_type.py: batch_size: expected int, got 'big' (str)"),
    (
        "a config file with a syntax error",
        ["{tmp}/bad_syntax.py"],
        "bad_syntax.py line 2: invalid syntax"),
    (
        "a config file that fails",
        ["{tmp}/bad_name.py"],
        "bad_name.py line 1: NameError: name 'gpus' is not"),
    (
        "a key a config file does not know",
        ["{tmp}/bad_key.py"],
        "bad_key.py sets unknown key 'lr' ("),
    ("a missing config file", ["config/nope.py"], "config file 'config/nope.py' not found"),
    (
        "a missing data file",
        ["--train_files=/nonexistent/x.parquet"],
        "data file '/nonexistent/x.parquet' not found"),
    (
        "no file matches the glob",
        ["--train_files=/nonexistent/*.parquet"],
        "no data file matches '/nonexistent/*.parquet'"),
    (
        "a folder as train_files",
        ["--train_files={tmp}/a_folder"],
        "a_folder is a folder, not a data file (nor a datasets save_to_disk folder): give its "
        "files, e.g. '"),
    (
        "a DatasetDict folder as train_files",
        ["--train_files={tmp}/dataset_dict"],
        "dataset_dict is a datasets DatasetDict (splits: train): give one split's folder, e.g. "),
    (
        "a file of no known format",
        ["--train_files={tmp}/rows.csv"],
        "rows.csv: not a data file this reads (.parquet, .arrow, .jsonl, .json"),
    (
        "a parquet with no rows",
        ["--train_files={tmp}/no_rows.parquet"],
        "no_rows.parquet has no rows"),
    (
        "a JSON lines file cut short",
        ["--train_files={tmp}/cut.jsonl"],
        "cut.jsonl line 2: the last line is cut short (Unterminated string starting at, column "),
    (
        "a ShareGPT role that does not exist",
        ["--train_files={tmp}/robot.jsonl"],
        "robot.jsonl line 1: key 'conversations' message 1 has unknown role 'robot' (ShareGPT"),
    (
        "an encoder (BERT) as init_from",
        ["--init_from={tmp}/bert"],
        "bert is a 'bert' model, an encoder: its attention is not causal (is_decoder is false)"),
    (
        "a model folder without its output weights",
        ["--init_from={tmp}/headless"],
        "headless: 1 weights of a Qwen3ForCausalLM are not in its files (lm_head.weight): not a "
        "causal LM's checkpoint"),
    (
        "data_format typo",
        ["--data_format=sharegtp"],
        "data_format='sharegtp': expected one of 'auto', 'prompt_target', 'messages', 'sharegpt' "
        "(did you mean sharegpt?)"),
    (
        "a parquet without the target column",
        ["--train_files={tmp}/no_target.parquet"],
        "no_target.parquet: missing column 'target' (columns: prompt, answer; set prompt_key / "
        "response_key"),
    (
        "init_from is not a folder",
        ["--init_from=/nonexistent"],
        "init_from='/nonexistent' is not a folder"),
    (
        "a model folder without a tokenizer",
        ["--init_from={tmp}/model_only"],
        "no tokenizer in the model folder"),
    (
        "a model folder without weights",
        ["--init_from={tmp}/no_weights"],
        "no_weights: cannot load the model ("),
    ("resume typo", ["--resume=maybe"], "resume='maybe': expected one of 'auto', 'disable'"),
    (
        "layout typo",
        ["--layout=splt"],
        "layout='splt': expected one of 'split', 'interleaved' (did you mean split?)"),
    (
        "parallel typo",
        ["--parallel=fsd"],
        "parallel='fsd': expected one of 'fsdp', 'ddp' (did you mean fsdp?)"),
    ("dtype typo", ["--dtype=fp16"], "dtype='fp16': expected one of 'auto', 'float32', 'bfloat16'"),
    (
        "attention typo",
        ["--attention=flash"],
        "attention='flash': expected one of 'auto', 'flex', 'sdpa'"),
    ("flex attention without CUDA", ["--attention=flex"], "attention='flex' needs CUDA"),
    ("CUDA without CUDA", ["--device=cuda"], "device='cuda' but no CUDA device is visible"),
    (
        "block_offset not an int",
        ["--block_offset=later"],
        "block_offset='later': expected 'random' or an int"),
    ("block_offset out of range", ["--block_offset=7"], "block_offset=7: must be between 0 and 3"),
    ("block_size 0", ["--block_size=0"], "block_size=0: must be between 1 and 127"),
    ("block_size -1", ["--block_size=-1"], "block_size=-1: must be between 1 and 127"),
    (
        "block_size longer than a row",
        ["--block_size=10000"],
        "block_size=10000: must be between 1 and 127"),
    ("max_length too small", ["--max_length=1"], "max_length=1: must be >= 2"),
    ("batch_size 0", ["--batch_size=0"], "batch_size=0: must be >= 1"),
    ("batch_size -1", ["--batch_size=-1"], "batch_size=-1: must be >= 1"),
    (
        "no accumulation steps",
        ["--gradient_accumulation_steps=0"],
        "gradient_accumulation_steps=0: must be >= 1"),
    (
        "accumulation not divisible by the ranks",
        ["--gradient_accumulation_steps=3", "WORLD_SIZE=2"],
        "must be divisible by the 2 ranks"),
    ("a negative learning rate", ["--learning_rate=-1"], "learning_rate=-1.0: must be > 0"),
    ("min_lr above learning_rate", ["--min_lr=1.0"], "min_lr=1.0: must be between 0.0 and 0.003"),
    ("negative max_steps", ["--max_steps=-5"], "max_steps=-5: must be >= 0"),
    ("negative save_every", ["--save_every=-1"], "save_every=-1: must be >= 0"),
    ("negative keep_last", ["--keep_last=-1"], "keep_last=-1: must be >= 0"),
    ("no epochs", ["--epochs=0"], "epochs=0: must be >= 1"),
    ("warmup over 100%", ["--warmup_ratio=2"], "warmup_ratio=2.0: must be between 0.0 and 1.0"),
    (
        "a head size RoPE cannot use",
        ["--n_embd=30", "--n_head=4"],
        "n_embd=30 / n_head=4: the head size"),
    (
        "prompt_format without {prompt}",
        ["--prompt_format=Q:"],
        "prompt_format='Q:': expected a str with a"),
    ("out_dir is a file", ["--out_dir={tmp}/a_file"], "a_file' is a file, not a folder"),
    (
        "out_dir cannot be created",
        ["--out_dir=/etc/hostname/run"],
        "is not writable: Not a directory"),
    (
        "every prompt longer than max_length",
        ["--max_length=10"],
        "no training samples left: every prompt in"),
    ("an override without =", ["--compile"], "'--compile': overrides are written --key=value"),
    (
        "a model folder whose weights are garbage",
        ["--init_from={tmp}/garbage_weights"],
        "garbage_weights: cannot load the model ("),
    (
        "a messages column holding a plain string",
        ["--train_files={tmp}/string_messages.parquet"],
        "string_messages.parquet row 0: column 'messages' must be a list of {role, content}"),
    ("max_nonfinite 0", ["--max_nonfinite=0"], "max_nonfinite=0: must be >= 1"),
    ("tensor_parallel 0", ["--tensor_parallel=0"], "tensor_parallel=0: must be >= 1"),
    (
        "tensor_parallel not dividing the ranks",
        ["--tensor_parallel=3", "WORLD_SIZE=4"],
        "tensor_parallel=3 must divide the 4 ranks"),
    (
        "tensor_parallel with DDP",
        ["--tensor_parallel=2", "--parallel=ddp", "WORLD_SIZE=2"],
        "tensor_parallel=2 needs parallel='fsdp'"),
    (
        "tensor_parallel not dividing the KV heads",
        ["--tensor_parallel=2", "--n_head=2", "--n_embd=64", "WORLD_SIZE=2"],
        "tensor_parallel=2 does not divide the model's num_key_value_heads=1"),
    (
        "tensor_parallel on a model without a plan",
        ["--tensor_parallel=2", "--init_from={tmp}/gpt2", "WORLD_SIZE=2"],
        "model type 'gpt2' has no tensor parallel plan")]

SAMPLE = [
    ("num_samples -1", ["--num_samples=-1"], "num_samples=-1: must be >= 0"),
    ("a scenario typo", ["--scenario=ar,losless"], "scenario='losless': expected one of"),
    ("batch_size 0", ["--batch_size=0"], "batch_size=0: must be >= 1"),
    ("max_new_tokens 0", ["--max_new_tokens=0"], "max_new_tokens=0: must be >= 1"),
    ("threshold above 1", ["--threshold=2"], "threshold=2.0: must be between 0.0 and 1.0"),
    (
        "a regex that does not compile",
        ["--answer_regex=(\\d+"],
        "answer_regex='(\\\\d+' is not a regular"),
    ("a regex without a group", ["--answer_regex=\\d+"], "needs a group: the answer is group 1"),
    (
        "summary_json in a missing folder",
        ["--summary_json=/nonexistent/s.json"],
        "its folder does not exist"),
    ("summary_json a folder", ["--summary_json={tmp}"], "is a folder: give a file name"),
    (
        "summary_json where nothing can be written",
        ["--summary_json=/proc/s.json"],
        "summary_json='/proc/s.json' cannot be written"),
    (
        "write_parquet in a missing folder",
        ["--write_parquet=/nonexistent/own.parquet"],
        "write_parquet='/nonexistent/own.parquet': its folder does not exist"),
    (
        "chat_template_kwargs not a dict",
        ["--chat_template_kwargs=[1]"],
        "chat_template_kwargs=[1]: expected a dict of template options"),
    (
        "chat_template_kwargs a number",
        ["--chat_template_kwargs=5"],
        "chat_template_kwargs=5: expected a dict of template options"),
    (
        "prompt_format without {prompt}",
        ["--prompt_format=Q:"],
        "prompt_format='Q:': expected a str with a {prompt} field"),
    ("color typo", ["--color=maybe"], "color='maybe': expected one of None, True, False"),
    ("temperature below 0", ["--ckpt={ckpt}", "--temperature=-1"], "temperature=-1.0: must be"),
    ("temperature not a number", ["--ckpt={ckpt}", "--temperature=hot"], "temperature='hot':"),
    ("top_p above 1", ["--ckpt={ckpt}", "--top_p=1.5"], "top_p=1.5: must be in (0, 1]"),
    ("top_p 0", ["--ckpt={ckpt}", "--top_p=0"], "top_p=0: must be in (0, 1]"),
    ("top_k below 0", ["--ckpt={ckpt}", "--top_k=-1"], "top_k=-1: must be an int >= 0"),
    ("min_p 1", ["--ckpt={ckpt}", "--min_p=1"], "min_p=1: must be in [0, 1)"),
    ("no samples per prompt", ["--samples_per_prompt=0"], "samples_per_prompt=0: must be >= 1"),
    ("drafts out of range", ["--ckpt={ckpt}", "--drafts=4"], "drafts=4: expected 'auto' or an int"),
    ("drafts typo", ["--ckpt={ckpt}", "--drafts=al"], "drafts='al': expected 'auto' or an int"),
    (
        "tensor_parallel not dividing the ranks",
        ["--tensor_parallel=2", "WORLD_SIZE=3"],
        "tensor_parallel=2 must divide the 3 ranks"),
    (
        "a model folder whose weights are garbage",
        ["--ckpt={tmp}/garbage_weights", "--prompt=hi"],
        "garbage_weights: cannot load the model ("),
    (
        "a messages column holding a plain string",
        ["--ckpt={ckpt}", "--data_files={tmp}/string_messages.parquet"],
        "column 'messages' must be a list of {role, content} messages, got a string"),
    ("CUDA without CUDA", ["--device=cuda"], "device='cuda' but no CUDA device is visible"),
    (
        "temperature nan",
        ["--ckpt={ckpt}", "--temperature=nan"],
        "temperature=nan: must be a number >= 0 (0: greedy; not inf or nan)"),
    (
        "temperature inf",
        ["--ckpt={ckpt}", "--temperature=inf"],
        "temperature=inf: must be a number >= 0 (0: greedy; not inf or nan)"),
    ("an empty prompt", ["--ckpt={ckpt}", "--prompt="], "prompt='' is empty: give the text to"),
    (
        "an encoder (BERT) as ckpt",
        ["--ckpt={tmp}/bert", "--prompt=hi"],
        "bert is a 'bert' model, an encoder: its attention is not causal"),
    ("dtype typo", ["--dtype=bf16"], "dtype='bf16': expected one of 'float32', 'bfloat16'"),
    (
        "no checkpoint yet",
        ["--out_dir=/nonexistent"],
        "checkpoint '/nonexistent' not found (run train.py first"),
    ("a missing data file", ["--ckpt={ckpt}", "--data_files=/nonexistent.parquet"], "not found"),
    (
        "a model without a mask token, block modes asked",
        ["--ckpt={tmp}/plain", "--scenario=lossless", "--prompt=hi"],
        "has no mask token")]

BENCH = [
    (
        "what typo",
        ["--what=trian"],
        "what='trian': expected one of 'train', 'decode', 'serve', 'data', 'trained' (did you mean "
        "train, trained?)"),
    ("preset typo", ["--preset=qwen9"], "preset='qwen9': expected one of"),
    ("block_size 0", ["--block_size=0"], "block_size=0: must be >= 1"),
    ("decode batch 0", ["--decode_batches=0"], "decode_batches=(0,): expected ints >= 1"),
    (
        "summary_json in a missing folder",
        ["--summary_json=/nonexistent/b.json"],
        "No such file or directory"),
    ("CUDA without CUDA", ["--device=cuda"], "device='cuda' but no CUDA device is visible")]


def fixtures(tmp):
    """The files the cases above point at."""
    from demo import demo_tokenizer
    (tmp / "bad_type.py").write_text("batch_size = 'big'\n")
    (tmp / "bad_syntax.py").write_text("batch_size = 2\nlearning_rate = = 1\n")
    (tmp / "bad_name.py").write_text("batch_size = 16 // gpus\n")
    (tmp / "bad_key.py").write_text("lr = 1e-4\n")
    (tmp / "a_file").write_text("")
    write_parquet(tmp / "no_target.parquet", [{"prompt": "hi", "answer": "yo"}])
    model = tiny_model(vocab_size=128)
    model.save_pretrained(tmp / "model_only")
    model.save_pretrained(tmp / "plain")
    demo_tokenizer().save_pretrained(tmp / "plain")
    os.makedirs(tmp / "no_weights")
    model.config.save_pretrained(tmp / "no_weights")
    demo_tokenizer().save_pretrained(tmp / "no_weights")
    model.save_pretrained(tmp / "garbage_weights")
    demo_tokenizer().save_pretrained(tmp / "garbage_weights")
    (tmp / "garbage_weights" / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    write_parquet(tmp / "string_messages.parquet", [{"messages": "What is 2+2?"}])
    import json
    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(tmp / "a_folder")
    (tmp / "a_folder" / "rows.jsonl").write_text('{"prompt": "hi", "target": "yo"}\n')
    os.makedirs(tmp / "dataset_dict" / "train")
    (tmp / "dataset_dict" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    (tmp / "dataset_dict" / "train" / "state.json").write_text('{"_data_files": []}')
    (tmp / "rows.csv").write_text("prompt,target\nhi,yo\n")
    pq.write_table(pa.table({"prompt": pa.array([], pa.string()),
                             "target": pa.array([], pa.string())}), tmp / "no_rows.parquet")
    (tmp / "cut.jsonl").write_text('{"prompt": "hi", "target": "yo"}\n{"prompt": "hi", "tar')
    (tmp / "robot.jsonl").write_text(json.dumps({"conversations": [
        {"from": "human", "value": "hi"}, {"from": "robot", "value": "yo"}]}) + "\n")
    from transformers import BertConfig, BertForMaskedLM, Qwen3Config, Qwen3Model
    tiny = dict(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=64)
    BertForMaskedLM(BertConfig(**tiny)).save_pretrained(tmp / "bert")
    demo_tokenizer().save_pretrained(tmp / "bert")
    Qwen3Model(Qwen3Config(**tiny, num_key_value_heads=2, head_dim=16,
                           tie_word_embeddings=False)).save_pretrained(tmp / "headless")
    demo_tokenizer().save_pretrained(tmp / "headless")
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128, bos_token_id=0,
                               eos_token_id=0)).save_pretrained(tmp / "gpt2")
    demo_tokenizer().save_pretrained(tmp / "gpt2")


def run(server, script, args, tmp, ckpt="", case=0):
    """`python script args` for one case, forked by a ForkServer: a CompletedProcess."""
    env = {}
    argv = []
    for a in args:
        if a.startswith("WORLD_SIZE="):
            env["WORLD_SIZE"] = a.split("=")[1]
        else:
            argv.append(a.format(tmp=tmp, ckpt=ckpt))
    # the case's own arguments come after, and win
    base = ["--device=cpu"]
    if script == "train.py":
        base = TINY + [f"--out_dir={tmp}/out{case}", f"--train_files={tmp}/train.parquet",
                       "--max_steps=1"]
    return server.run(script, [*base, *argv], env, timeout=300)


def all_cases(tmp, ckpt, servers=3):
    """Every case, run by `servers` ForkServers side by side: [(case, CompletedProcess)]."""
    cases = [("train.py", *c) for c in TRAIN] + [("sample.py", *c) for c in SAMPLE] + \
        [("bench.py", *c) for c in BENCH]

    def shard(first):
        server = ForkServer({"CUDA_VISIBLE_DEVICES": ""})
        try:
            return [(i, run(server, c[0], c[2], tmp, ckpt, i))
                    for i, c in enumerate(cases) if i % servers == first]
        finally:
            server.close()

    with ThreadPoolExecutor(servers) as pool:
        results = dict(r for done in pool.map(shard, range(servers)) for r in done)
    return [(c, results[i]) for i, c in enumerate(cases)]


def test_every_mistake_is_one_line(tmp_path, train_file, trained_demo):
    import shutil
    shutil.copy(train_file, tmp_path / "train.parquet")
    fixtures(tmp_path)
    failures = []
    for (script, what, args, message), p in all_cases(tmp_path, trained_demo["out_dir"]):
        ok = p.returncode == 1 and p.stderr.startswith("error: ") and p.stderr.count("\n") == 1 \
            and message in p.stderr
        if not ok:
            failures.append(f"{script} {' '.join(args)} ({what}): rc {p.returncode}, "
                            f"stderr {p.stderr[-600:]!r}")
    assert not failures, "\n".join(failures)
    # none ran
    assert not any(
        os.path.exists(tmp_path / f"out{i}" / "global_step_1") for i in range(len(TRAIN)))


if __name__ == "__main__":  # the table in docs/errors.md
    import tempfile
    from pathlib import Path

    sys.path.insert(0, ROOT)
    from demo import write_demo_data
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        shutil_src = write_demo_data(str(tmp / "data"), n_train=96, n_test=8)["train"]
        os.replace(shutil_src, tmp / "train.parquet")
        fixtures(tmp)
        print("| script | mistake | what it prints |\n|---|---|---|")
        for (script, what, args, _), p in all_cases(tmp, sys.argv[1] if len(sys.argv) > 1 else ""):
            line = p.stderr.strip().splitlines()[-1].replace(str(tmp), "/tmp/x").replace("|", "\\|")
            shown = " ".join(args).replace("{tmp}", "/tmp/x").replace("{ckpt}", "out/demo")
            print(f"| `{script}` | {what} (`{shown}`) | `{line}` |")
