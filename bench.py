"""
Speed, measured side by side in one run: ratios on the same samples and model, never absolute
claims (correctness lives in the tests: tests/test_gpu.py on a GPU).

  python bench.py                        # CPU-sized: a tiny random model, dense mask (SDPA)
  python bench.py --preset=qwen3-0.6b    # CUDA: Qwen3-0.6B's shape, random weights (no download)
  python bench.py --check=True --summary_json=b.json   # a GPU: its tests, then trained models
  python bench.py --what=decode --ckpt=out/demo        # a trained checkpoint on its own data
  python bench.py --what=serve --ckpt=out/demo         # serve.py under 1, 8, 32 clients

train: an optimizer step of plain SFT, next-block SFT (both layouts) and gated LoRA on the same
samples. decode: ar, lossless ('auto' and every draft) and HF generate per batch size, greedy and
sampled. serve: loadgen.py's clients, lossless against ar. data: the store, a warm start, Batches,
train.py's start-up. trained: the demo task trained at block sizes 4, 8, 16 until it drafts, then
decoded. Each part runs even when one before it crashed (the JSON is rewritten after each); a
crash or a failed test makes the exit code 1.
"""
# configurator first: from here on a mistake, or a Ctrl-C while torch loads, prints one line
from configurator import UserError, at_least, configure, first_line, one_of
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from typing import NamedTuple

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

import chat
import data
import lora
from checkpoint import load_for_decoding
from common import ceil_to, resolve_device, to_device
from demo import write_demo_data
from workloads import bench_data, bench_serve
from mask import row_multiple
from model import attention_backend, flops_per_token, forward_losses, peak_flops
from sample import generate
from store import expand_files

# -------------------------------------------------------------------------------------------------
# config (python bench.py [config.py] --key=value)
preset = "auto"                  # 'auto' (tiny on CPU, qwen3-0.6b on CUDA), 'tiny', 'qwen3-0.6b',
#                                  'qwen3-8b', 'llama-8b'
what = "train,decode"            # 'train', 'decode', 'serve', 'data', 'trained' (a list), 'none'
check = False                    # first `pytest -m gpu` (tests/test_gpu.py), then 'trained'
rows = 0                         # train: samples per step, one per row; 0 = preset's
seq_len = 0                      # train: clean tokens per sample (prompt + response); 0 = preset's
prompt_len = 0                   # tokens of each prompt; 0 = preset's
block_size = 4                   # next-block size
steps = 5                        # timed train steps (after 2 warm-up steps), median reported
gradient_checkpointing = False   # recompute activations in backward (memory vs time)
ckpt = ""                        # decode, serve: a train.py checkpoint or out_dir (else the preset
#                                  model; serve: needs one)
data_files = "data/demo/test.parquet"  # decode, serve with ckpt: prompts from these files
decode_samples = 0               # decode: prompts; 0 = preset's (a checkpoint: 128)
decode_batches = (1, 8, 32, 64)  # decode: the batch sizes to measure (--decode_batches=1,8)
max_new_tokens = 0               # decode, serve: tokens per answer; 0 = preset's (trained: 96)
sampling = "greedy,sampled"      # decode: 'greedy', 'sampled' (temperature 0.6, top_p 0.95), both
compile = False                  # decode: torch.compile our decoding step; HF: a static cache
#                                  (which HF generate compiles itself on CUDA)
serve_clients = (1, 8, 32)       # serve: concurrent clients to measure
serve_rounds = 2                 # serve: turns of (ar, lossless) at each client count
trained_blocks = (4, 8, 16)      # trained: block sizes (CPU: the first only, a dry run)
trained_tpf = 3.0                # trained: train until the held-out tpf_tf reaches this
trained_steps = 0                # trained: train.py steps (one round); 0 = each shape's plan
trained_samples = 0              # trained: held-out prompts decoded; 0 = 128 (CUDA), 32 (CPU)
tokenizer = ""                   # data: a model folder whose tokenizer to use; '' = the demo's
data_samples = 2000              # data: synthetic reasoning samples (~1.4k tokens with a BPE)
device = "auto"                  # 'auto', 'cpu', 'cuda'
attention = "auto"               # train: 'auto' (flex on CUDA, else sdpa), 'flex', 'sdpa'
summary_json = ""                # write every number here
seed = 0                         # random model and data, and the draws of sampled decoding
# -------------------------------------------------------------------------------------------------
_QWEN3 = dict(model_type="qwen3", vocab_size=151936, num_key_value_heads=8, head_dim=128)
PRESETS = {  # (model config, rows, seq_len, prompt_len, decode samples, new tokens)
    "tiny": (dict(model_type="qwen3", vocab_size=2048, hidden_size=256, intermediate_size=768,
                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                  tie_word_embeddings=True), 2, 508, 60, 8, 64),
    "qwen3-0.6b": (dict(_QWEN3, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                        num_attention_heads=16, tie_word_embeddings=True), 4, 4092, 256, 64, 128),
    "qwen3-8b": (dict(_QWEN3, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                      num_attention_heads=32, tie_word_embeddings=False), 1, 4092, 256, 16, 128),
    "llama-8b": (dict(model_type="llama", vocab_size=128256, hidden_size=4096,
                      intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, tie_word_embeddings=False), 1, 4092, 256, 16, 128)}
HERE = os.path.dirname(os.path.abspath(__file__))  # train.py and serve.py run from here
SAMPLINGS = {"greedy": {"temperature": 0.0},
             "sampled": {"temperature": 0.6, "top_p": 0.95, "top_k": 0}}
DECODE_MODES = ("ar", "lossless_auto", "lossless_full", "hf_generate")
# trained: the demo task (3-digit additions) learned by train.py until it drafts. name: (n_layer,
# n_embd, n_head, learning_rate, first round of steps, step cap); min_lr = lr / 10. The CPU one
# reaches tpf_tf 3.1 in 200 steps (~20 s on 2 cores)
TRAINED_SHAPES = {"cuda": {"demo": (4, 128, 4, 6e-3, 400, 1200), "wide": (8, 768, 12, 1e-3, 400,
                                                                          1200)},
                  "cpu": {"small": (2, 128, 4, 6e-3, 200, 600)}}


class Decoding(NamedTuple):
    """What decoding a model's prompts needs besides them."""
    eos: list  # stop tokens
    mask_id: int
    pad_id: int  # HF generate's left padding
    B: int  # block size
    dev: object = None


def build_model(cfg, attn, dev, dtype, seed_):
    cfg = dict(cfg)
    config = AutoConfig.for_model(cfg.pop("model_type"), max_position_embeddings=16384, **cfg)
    torch.manual_seed(seed_)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype).to(dev)


def samples_for(n, length, prompt, vocab, seed_):
    """n random (prompt, response) token lists, the same for a seed."""
    g = torch.Generator().manual_seed(seed_)
    return [(torch.randint(1, vocab - 1, (prompt,), generator=g).tolist(),
             torch.randint(1, vocab - 1, (length - prompt,), generator=g).tolist())
            for _ in range(n)]


def synchronize(dev):
    """Wait for the GPU's queued work, so that a timer reads what it ran (nothing to wait for on
    CPU)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev, n):
    """Median seconds of fn() over n runs after two warm-ups, and the peak memory (bytes) of one
    run."""
    for _ in range(2):
        fn()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(n):
        synchronize(dev)
        t = time.perf_counter()
        fn()
        synchronize(dev)
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else None
    return statistics.median(times), peak


# -------------------------------------------------------------------------------------------------
# train

def example(prompt, response, B, mask_id, layout, offset=0):
    return data.build_example(prompt + response, [(len(prompt), len(prompt) + len(response))], B,
                              mask_id, layout, offset)


def bench_train(cfg, dev, attn, samples, mask_id, B, n_steps, checkpointing, seed_):
    """Seconds per optimizer step for the same samples: plain SFT, next-block in both layouts, and
    next-block with gated LoRA (base frozen, adapters on the masks: lora.py) instead of full
    fine-tuning."""
    peak, results = peak_flops(dev), {}
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    for name, b, layout, finetune in (("plain", 1, "split", "full"),
                                      ("split", B, "split", "full"),
                                      ("interleaved", B, "interleaved", "full"),
                                      ("split_gated_lora", B, "split", "gated_lora")):
        model = optimizer = None  # the last run's memory is free before this one's
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        model = build_model(cfg, attn, dev, torch.float32, seed_)
        if finetune == "gated_lora":
            lora.add_adapters(model, 16, 32.0)
        if checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=dev.type == "cuda")
        examples = [example(p, r, b, mask_id, layout) for p, r in samples]
        multiple = row_multiple(attn)
        length = ceil_to(max(len(e["input_ids"]) for e in examples), multiple)
        batch = to_device(data.collate(examples, length, multiple, mask_id), dev)
        supervised = (batch["labels"] != -100).sum()

        def step():
            with autocast:
                losses, _, _ = forward_losses(model, batch)  # builds the mask, as train.py
            (losses.sum() / supervised).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        seconds, memory = timed(step, dev, n_steps)
        real = batch["doc_ids"] >= 0
        total, clean = int(real.sum()), int((real & ~batch["is_mask"]).sum())
        n_trainable = sum(p.numel() for p in trainable)
        state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values()
                          for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
        row = {"seconds": seconds, "rows": batch["input_ids"].shape[0],
               "row_length": batch["input_ids"].shape[1], "clean_tokens": clean,
               "total_tokens": total, "clean_tokens_per_s": clean / seconds,
               "total_tokens_per_s": total / seconds,
               "peak_memory_gb": memory / 2**30 if memory else None,
               "trainable_params": n_trainable, "optimizer_state_mb": state_bytes / 2**20}
        if peak:
            row["mfu"] = flops_per_token(model, row["row_length"]) * total / seconds / peak
        results[name] = row
        print(f"train {name:16s} {seconds:.4f} s/step | {clean / seconds:9.0f} clean tok/s | "
              f"{total / seconds:9.0f} total tok/s | rows {row['rows']} x {row['row_length']} | "
              f"trainable {n_trainable / 1e6:.2f}M, AdamW state {row['optimizer_state_mb']:.1f} "
              "MiB" + (f" | peak {row['peak_memory_gb']:.1f} GiB" if memory else "")
              + (f" | mfu {100 * row['mfu']:.0f}%" if peak else ""), flush=True)
    ratios = (("split_vs_plain", "split", "plain"),
              ("interleaved_vs_plain", "interleaved", "plain"),
              ("gated_lora_vs_full", "split_gated_lora", "split"))
    for key, a, b in ratios:
        results[f"{key}_time"] = results[a]["seconds"] / results[b]["seconds"]
        if results[b]["peak_memory_gb"]:
            results[f"{key}_memory"] = results[a]["peak_memory_gb"] / results[b]["peak_memory_gb"]
    print("train ratios: " + ", ".join(
        f"{key.replace('_vs_', '/')} {results[f'{key}_time']:.2f}x time"
        + (f" {results[f'{key}_memory']:.2f}x memory" if f"{key}_memory" in results else "")
        for key, _, _ in ratios), flush=True)
    return results


# -------------------------------------------------------------------------------------------------
# decode

def hf_generate(model, prompts, d, n_new, how, compiled, seed_):
    """HF generate on a left-padded batch, greedy or sampled as SAMPLINGS[how] (its own draws:
    comparable to ours in distribution only); compiled: a static cache, which generate compiles
    itself on CUDA. Returns each row's tokens up to and including its first stop token, as our
    generate does."""
    width = max(map(len, prompts))
    ids = torch.tensor([[d.pad_id] * (width - len(p)) + p for p in prompts], device=d.dev)
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                             device=d.dev)
    extra = {"cache_implementation": "static"} if compiled else {}
    if how == "sampled":
        torch.manual_seed(seed_)
        extra.update(SAMPLINGS["sampled"])
    out = model.generate(ids, attention_mask=attention, do_sample=how == "sampled",
                         max_new_tokens=n_new, pad_token_id=d.pad_id,
                         eos_token_id=sorted(d.eos) if d.eos else None, **extra)[:, width:]
    stops = d.eos or ()
    return [row[:next((i + 1 for i, t in enumerate(row) if t in stops), len(row))]
            for row in out.tolist()]


def decode_once(model, part, first, mode, n_new, bs, how, compiled, d, seed_):
    """One mode on the prompts `part` (first: the index of part[0] among all prompts: seed + index
    is each prompt's seed), bs at a time: [(tokens, stats)]."""
    if mode == "hf_generate":
        return [(toks, {"tokens": len(toks), "forwards": len(toks)})
                for i in range(0, len(part), bs)
                for toks in hf_generate(model, part[i:i + bs], d, n_new, how,
                                        compiled and d.dev.type == "cuda", seed_ + first + i)]
    kind, drafts = mode.partition("_")[::2]  # ar, lossless_auto, lossless_full
    return generate(model, part, kind, n_new, block_size=d.B, mask_token_id=d.mask_id,
                    eos_token_id=d.eos, batch_size=bs, drafts=d.B - 1 if drafts == "full"
                    else "auto", seed=list(range(seed_ + first, seed_ + first + len(part))),
                    compile=compiled, **SAMPLINGS[how])


def bench_decode(model, prompts, d, n_new, batches, how, compiled, seed_, least=0):
    """ar, lossless (drafts 'auto' and all), HF generate on the same prompts at each batch size, one
    sampling setting. The modes take turns on chunks of the prompts, in reverse order every other
    chunk, so that a change in the machine's load (a shared CPU) weighs on every mode alike; each
    batch size is warmed up first (lossless 'auto' calibrates per batch size; compile builds its
    graphs). With least, batch size bs decodes only the first max(least, 2 bs) prompts: about the
    same time at every size."""
    out, sizes = {}, [bs for bs in batches if bs <= len(prompts)]
    if len(sizes) < len(batches):
        print(f"decode: batch sizes above the {len(prompts)} prompts skipped", flush=True)
    for bs in sizes:
        used = prompts[:max(least, 2 * bs)] if least else prompts
        chunk = max(2 * bs, 8)
        parts = [(i, used[i:i + chunk]) for i in range(0, len(used), chunk)]
        warm = n_new if compiled else min(n_new, 8)  # compiled: the same cache shape as timed
        for n_rows in sorted({min(bs, len(p)) for _, p in parts}):
            for mode in DECODE_MODES:
                decode_once(model, used[:n_rows], 0, mode, warm, bs, how, compiled, d, seed_)
        # one chunk (the largest batch): two rounds, the second in reverse order, so that a drift
        # in the machine's speed weighs on every mode alike (A B C D, D C B A)
        rounds = parts * (2 if len(parts) == 1 else 1)
        res = {m: {"prompts": sum(len(p) for _, p in rounds), "tokens": 0, "forwards": 0,
                   "seconds": 0.0} for m in DECODE_MODES}
        outputs, shapes = {m: [] for m in DECODE_MODES}, Counter()
        for turn, (first, part) in enumerate(rounds):
            for mode in DECODE_MODES[::-1] if turn % 2 else DECODE_MODES:
                synchronize(d.dev)
                t = time.perf_counter()
                decoded = decode_once(model, part, first, mode, n_new, bs, how, compiled, d, seed_)
                synchronize(d.dev)
                row = res[mode]
                row["seconds"] += time.perf_counter() - t
                row["tokens"] += sum(s["tokens"] for _, s in decoded)
                row["forwards"] += sum(s["forwards"] for _, s in decoded)
                outputs[mode] += [toks for toks, _ in decoded]
                if mode == "lossless_auto":
                    for _, stats in decoded:
                        shapes.update(stats["shapes"])
        for mode, row in res.items():
            row["tokens_per_s"] = row["tokens"] / row["seconds"]
            row["tokens_per_forward"] = row["tokens"] / max(row["forwards"], 1)
        for mode, row in res.items():
            row["speedup_vs_ar"] = row["tokens_per_s"] / res["ar"]["tokens_per_s"]
            row["speedup_vs_hf"] = row["tokens_per_s"] / res["hf_generate"]["tokens_per_s"]
            if mode != "hf_generate" or how == "greedy":  # HF samples with its own draws
                row["same_as_ar"] = sum(a == b for a, b in zip(outputs[mode], outputs["ar"]))
        total = max(sum(shapes.values()), 1)
        res["lossless_auto"]["shapes"] = {k: n / total for k, n in shapes.most_common()}
        out[f"batch_{bs}"] = res
    return out


def decode_table(results, title):
    """The decode numbers of one setting as text: a line per batch size and mode."""
    lines = [title, "batch  mode             tokens/s  tok/fwd  vs ar  vs hf  same_as_ar  k,m mix"]
    for batch, res in results.items():
        for mode, r in res.items():
            same = f"{r['same_as_ar']}/{r['prompts']}" if "same_as_ar" in r else "-"
            mix = " ".join(f"{k} {100 * v:.0f}%" for k, v in r.get("shapes", {}).items()
                           if v >= 0.005)
            lines.append(f"{batch[6:]:>5}  {mode:15s} {r['tokens_per_s']:9.1f} "
                         f"{r['tokens_per_forward']:8.2f} {r['speedup_vs_ar']:6.2f} "
                         f"{r['speedup_vs_hf']:6.2f} {same:>11}  {mix}".rstrip())
    return "\n".join(lines)


def checkpoint_inputs(path, files, n, dev, B):
    """(model, prompts, Decoding, folder, conversation prompts) of a train.py checkpoint on the
    first n rows of files, as sample.py reads them: fp32 (lossless == ar exactly), its block size
    (else B), mask token, template options and stop tokens."""
    model, tok, folder = load_for_decoding(path, dev)
    mask_id = getattr(model.config, "mask_token_id", None)
    if mask_id is None:
        raise UserError(f"{folder} has no mask token (config.mask_token_id): not trained by "
                        "train.py")
    conversation = chat.Chat(tok, getattr(model.config, "chat_template_kwargs", None) or {})
    rows = chat.read_rows(expand_files(files), require_target=False)[:n]
    asked = [chat.split_for_decoding(m, first)[0] for m, first, _, _ in rows]
    prompts = [conversation.prompt_ids(a, tools) for a, (_, _, tools, _) in zip(asked, rows)]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    d = Decoding(conversation.stop_ids(), mask_id, pad,
                 getattr(model.config, "next_block_size", None) or B, dev)
    return model, prompts, d, folder, asked


def decode_inputs(cfg, n_prompt, n, path, files, B, seed_):
    """(model loader, prompts, Decoding but dev, source) to decode: a trained checkpoint on its data
    (its own mask token, block size and stop tokens), or the random preset model on random
    prompts. Paths and data are read here, before any part runs, so that a typo costs nothing."""
    if not path:
        prompts = [p for p, _ in samples_for(n, n_prompt + 1, n_prompt, cfg["vocab_size"], seed_)]
        return (lambda dev: build_model(cfg, "sdpa", dev, torch.float32, seed_).eval(), prompts,
                Decoding(None, cfg["vocab_size"] - 1, 0, B), "random preset")
    model, prompts, d, folder, _ = checkpoint_inputs(path, files, n, torch.device("cpu"), B)
    return lambda dev: model.to(dev), prompts, d._replace(dev=None), folder


# -------------------------------------------------------------------------------------------------
# trained: the demo task learned until it drafts, at each block size

def train_demo(work, out, files, args, steps):
    """train.py on the demo data as a subprocess (it resumes out's run, up to `steps`): the last
    eval row of its metrics.jsonl. Its output goes to out.log; a failure raises with its tail."""
    cmd = [sys.executable, "train.py", f"--out_dir={out}", f"--data_cache={work}/cache",
           f"--train_files={files['train']}", f"--val_files={files['test']}", "--demo_data=False",
           "--keep_last=1", f"--max_steps={steps}", *args]
    with open(f"{out}.log", "a") as log:
        rc = subprocess.run(cmd, cwd=HERE, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc:
        with open(f"{out}.log") as f:
            raise RuntimeError(f"train.py exited {rc}: {' '.join(cmd)}\n{f.read()[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "tpf_tf" in r][-1]


def bench_trained(dev, blocks, tpf, fixed_steps, n, n_new, batches, seed_, saved):
    """For each shape of TRAINED_SHAPES and block size (CPU: the first, a dry run): train.py on the
    demo task (3-digit additions) in rounds of more steps until the held-out tpf_tf reaches tpf
    (or the step cap), then its held-out prompts decoded greedily (bench_decode). saved(report)
    after each: a partial result is kept."""
    work, report = tempfile.mkdtemp(prefix="bench-trained-"), {}
    files = write_demo_data(os.path.join(work, "data"), n_test=max(n, 64))
    for name, (n_layer, n_embd, n_head, lr, first, cap) in TRAINED_SHAPES[dev.type].items():
        for B in blocks if dev.type == "cuda" else blocks[:1]:
            r = report[f"{name}_b{B}"] = {"n_layer": n_layer, "n_embd": n_embd, "block_size": B,
                                          "rounds": []}
            args = [f"--device={dev.type}", f"--n_layer={n_layer}", f"--n_embd={n_embd}",
                    f"--n_head={n_head}", f"--learning_rate={lr}", f"--min_lr={lr / 10}",
                    f"--block_size={B}", "--log_every=50", "--attention=sdpa"]
            try:
                target, t, out = fixed_steps or first, time.perf_counter(), f"{work}/{name}_b{B}"
                while True:
                    row = train_demo(work, out, files, args, target)
                    r["rounds"].append({"steps": target, "tpf_tf": row["tpf_tf"]})
                    print(f"trained {name} B={B}: {target} steps, held-out tpf_tf "
                          f"{row['tpf_tf']:.2f}", flush=True)
                    if row["tpf_tf"] >= tpf or fixed_steps or target >= cap:
                        break
                    target = min(cap, 2 * target)
                r.update(steps=target, tpf_tf=row["tpf_tf"], train_seconds=time.perf_counter() - t,
                         acc={k: v for k, v in row.items() if k.startswith("acc@")})
                model, prompts, d, _, _ = checkpoint_inputs(out, files["test"], n, dev, B)
                r["decode"] = bench_decode(model, prompts, d, n_new, batches, "greedy", False,
                                           seed_, least=16)
                print(decode_table(r["decode"], f"trained {name} B={B} (tpf_tf {r['tpf_tf']:.2f}), "
                                   "greedy, held-out prompts"), flush=True)
            except Exception:
                traceback.print_exc()
                r["error"] = traceback.format_exc()
            saved(report)
    shutil.rmtree(work, ignore_errors=True)
    return report


def gpu_tests():
    """`pytest -m gpu tests/test_gpu.py` (the correctness checks for a GPU; skipped without CUDA):
    its exit code and summary line; a failure is the bench's."""
    p = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-rs",
                        "-p", "no:cacheprovider"], cwd=HERE, capture_output=True, text=True)
    lines = (p.stdout + p.stderr).strip().splitlines()
    print("\n".join(lines[-40:]), flush=True)
    summary = next((line for line in reversed(lines) if " in " in line and "=" not in line[:1]
                    and ("passed" in line or "skipped" in line or "failed" in line)), "")
    report = {"returncode": p.returncode, "summary": summary}
    if p.returncode:
        report.update(output="\n".join(lines[-200:]), failures=["gpu tests"])
    return report


# -------------------------------------------------------------------------------------------------
if __name__ == "__main__":
    config = configure(globals())
    dev = resolve_device(device)
    name = one_of("preset", preset if preset != "auto" else
                  ("qwen3-0.6b" if dev.type == "cuda" else "tiny"), tuple(PRESETS))
    parts = [p for p in what.split(",") if p != "none"] + ["trained"] * check
    for part in parts:
        one_of("what", part, ("train", "decode", "serve", "data", "trained"))
    hows = sampling.split(",")
    for how in hows:
        one_of("sampling", how, tuple(SAMPLINGS))
    for key in ("decode_batches", "serve_clients", "trained_blocks"):
        if not all(isinstance(b, int) and b >= 1 for b in globals()[key]):
            raise UserError(f"{key}={globals()[key]!r}: expected ints >= 1, e.g. --{key}=1,8,32")
    for key, low in (("block_size", 1), ("steps", 1), ("serve_rounds", 1), ("trained_steps", 0),
                     ("trained_samples", 0), ("max_new_tokens", 0), ("decode_samples", 0)):
        at_least(key, globals()[key], low)
    if "serve" in parts and not ckpt:
        raise UserError("what=serve needs ckpt: a train.py checkpoint to serve")
    cfg, p_rows, p_len, p_prompt, p_dec, p_new = PRESETS[name]
    attn = attention_backend(attention, dev, training=True)
    machine = torch.cuda.get_device_name(dev) if dev.type == "cuda" else \
        f"CPU ({torch.get_num_threads()} threads)"
    print(f"bench.py | {machine} | torch {torch.__version__} | transformers "
          f"{transformers.__version__} | preset {name} | attention {attn} | block_size "
          f"{block_size}", flush=True)
    out = {"machine": machine, "torch": torch.__version__, "preset": name, "attention": attn,
           "transformers": transformers.__version__, "block_size": block_size, "seconds": {}}
    n_new = max_new_tokens or p_new
    if "decode" in parts:  # read now: a typo in a path costs nothing
        load, prompts, decoding, out["decode_model"] = decode_inputs(
            cfg, prompt_len or p_prompt, decode_samples or (128 if ckpt else p_dec), ckpt,
            data_files, block_size, seed)
    failures = []

    def save():
        if summary_json:
            with open(summary_json, "w") as f:
                json.dump(out, f, indent=1)

    try:
        save()  # now, so that a bad path fails before any part runs
    except OSError as e:
        raise UserError(f"summary_json={summary_json!r}: {e.strerror}") from None

    def section(part, fn):
        """Run one part. A crash is printed and recorded, the other parts still run, and the JSON
        is rewritten after every part: a GPU session may get one try, and a partial result beats
        none."""
        t = time.perf_counter()
        try:
            out[part] = fn()
            failures.extend(out[part].get("failures", []))
        except UserError:
            raise
        except Exception as e:
            traceback.print_exc()
            out[part] = {"error": traceback.format_exc()}
            failures.append(f"{part} crashed ({first_line(e)})")
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        out["seconds"][part] = time.perf_counter() - t
        print(f"[{part}: {out['seconds'][part]:.0f} s]", flush=True)
        save()

    def partial(report):
        out["trained"] = report
        save()

    samples = samples_for(rows or p_rows, seq_len or p_len, prompt_len or p_prompt,
                          cfg["vocab_size"], seed)
    runs = {"train": lambda: bench_train(cfg, dev, attn, samples, cfg["vocab_size"] - 1,
                                         block_size, steps, gradient_checkpointing, seed),
            "data": lambda: bench_data(tokenizer, data_samples, block_size, seed,
                                       PRESETS["tiny"][0]),
            "decode": lambda: {how: bench_decode(load(dev), prompts, decoding._replace(dev=dev),
                                                 n_new, list(decode_batches), how, compile, seed)
                               for how in hows},
            "serve": lambda: bench_serve(ckpt, [chat.split_for_decoding(m, first)[0] for m, first, _, _
                                                in chat.read_rows(expand_files(data_files),
                                                                  require_target=False)[:64]],
                                         list(serve_clients), serve_rounds, max_new_tokens or 96,
                                         dev.type),
            "trained": lambda: bench_trained(dev, list(trained_blocks), trained_tpf,
                                             trained_steps, trained_samples or
                                             (128 if dev.type == "cuda" else 32),
                                             max_new_tokens or 96, list(decode_batches), seed,
                                             partial)}
    if check:
        section("gpu_tests", gpu_tests)
    for part in parts:
        section(part, runs[part])
        if part == "decode":
            for how in hows:
                print(decode_table(out["decode"].get(how, {}), f"decode, {how} ({len(prompts)} "
                                   f"prompts, up to {n_new} new tokens, block size {decoding.B})"),
                      flush=True)
    if failures:
        print(f"FAILED: {', '.join(failures)}")
        sys.exit(1)
