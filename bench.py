"""
Speed, measured side by side in one run: ratios on the same samples and the same model, never
absolute claims.

  python bench.py                        # CPU-sized: a tiny random model, dense mask (SDPA)
  python bench.py --preset=qwen3-0.6b    # CUDA: Qwen3-0.6B's shape, random weights (no download)
  python bench.py --check=True --summary_json=b.json   # CUDA: correctness checks, then benchmarks
  python bench.py --what=decode --ckpt=out/demo        # a trained checkpoint on its own data

train:  one optimizer step (forward, backward, AdamW) on the same samples as (a) plain SFT: clean
        tokens, causal; (b) next-block SFT, split layout; (c) interleaved layout; (d) split with
        gated LoRA. Time, tokens/s (clean and total), peak memory, the ratios b/a, c/a and d/b, MFU
        on known GPUs.
decode: ar, lossless with drafts='auto' and with every draft verified (lossless_full), and HF
        generate, on the same model and prompts at each batch size of decode_batches, greedy and
        sampled: tokens/s, tokens per forward, speedup over ar and over HF at the same batch size,
        how many outputs equal ar's (lossless must: the same draws), the (k, m) steps 'auto' chose.
data:   the data path on a synthetic reasoning corpus: the store, a warm start, Batches, train.py's
        start-up.
check:  the BlockMask path equals the dense path (loss and gradients, fp32 and bf16; forward only on
        CPU); lossless == ar in fp32, greedy and sampled; batched decoding == one prompt at a time
        for every mode; a model trained by train.py on the demo task until it drafts (held-out
        tpf_tf >= check_tpf), decoded by every mode and HF generate (on CUDA: two shapes, eager and
        compiled); train.py under tensor parallelism on 2 GPUs (skipped with fewer).
Every part runs even when an earlier one crashed (its traceback is printed and kept in the JSON,
which is rewritten after each part); a failed check or a crash makes the exit code 1.
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

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

import chat
import data
import lora
from checkpoint import load_for_decoding
from common import ceil_to, resolve_device, to_device
from demo import write_demo_data
from model import attention_backend, flops_per_token, forward_losses, peak_flops
from sample import generate
from store import expand_files, load_store

# -------------------------------------------------------------------------------------------------
# config (python bench.py [config.py] --key=value)
preset = "auto"                  # 'auto' (tiny on CPU, qwen3-0.6b on CUDA), 'tiny', 'qwen3-0.6b',
#                                  'qwen3-8b', 'llama-8b'
what = "train,decode"            # benchmarks: 'train', 'decode', 'data' (a list), or 'none'
check = False                    # correctness checks first (meant for CUDA; CPU: a smaller dry run)
rows = 0                         # train: samples per step, one per row; 0 = preset's
seq_len = 0                      # train: clean tokens per sample (prompt + response); 0 = preset's
prompt_len = 0                   # tokens of each prompt; 0 = preset's
block_size = 4                   # next-block size
steps = 5                        # timed train steps (after 2 warm-up steps), median reported
gradient_checkpointing = False   # recompute activations in backward (memory vs time)
ckpt = ""                        # decode: a train.py checkpoint or out_dir (else the preset model)
data_files = "data/demo/test.parquet"  # decode with ckpt: prompts from this parquet
decode_samples = 0               # decode: prompts; 0 = preset's (a checkpoint: 128)
decode_batches = (1, 8, 32, 64)  # decode: the batch sizes to measure (--decode_batches=1,8)
max_new_tokens = 0               # decode: tokens per prompt; 0 = preset's (check_trained: 96)
sampling = "greedy,sampled"      # decode: 'greedy', 'sampled' (temperature 0.6, top_p 0.95), both
compile = False                  # decode: torch.compile our decoding step; HF: a static cache
#                                  (which HF generate compiles itself on CUDA)
check_steps = 0                  # check_trained: train.py steps (one round); 0 = each shape's plan
check_samples = 0                # check_trained: held-out prompts decoded; 0 = 128 (CUDA), 32 (CPU)
check_tpf = 3.0                  # check_trained: train until the held-out tpf_tf reaches this (a
#                                  failure if the step cap comes first); 0 = any
check_compiled = (1,)            # check_trained on CUDA, the wide model: batch sizes also decoded
#                                  compiled (ours with compile=True, HF with a static cache; each
#                                  size compiles ~6 step shapes: minutes); () = none
tokenizer = ""                   # data: a model folder whose tokenizer to use; '' = the demo's
data_samples = 2000              # data: synthetic reasoning samples (~1.4k tokens with a BPE)
device = "auto"                  # 'auto', 'cpu', 'cuda'
attention = "auto"               # train: 'auto' (flex on CUDA, else sdpa), 'flex', 'sdpa'
summary_json = ""                # write every number here
seed = 0                         # random model and data, and the draws of sampled decoding
# -------------------------------------------------------------------------------------------------
if __name__ == "__main__":
    config = configure(globals())

PRESETS = {  # (model config, rows, seq_len, prompt_len, decode samples, new tokens)
    "tiny": (dict(model_type="qwen3", vocab_size=2048, hidden_size=256, intermediate_size=768,
                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                  tie_word_embeddings=True), 2, 508, 60, 8, 64),
    "qwen3-0.6b": (dict(model_type="qwen3", vocab_size=151936, hidden_size=1024,
                        intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                        num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
                   4, 4092, 256, 64, 128),
    "qwen3-8b": (dict(model_type="qwen3", vocab_size=151936, hidden_size=4096,
                      intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
                 1, 4092, 256, 16, 128),
    "llama-8b": (dict(model_type="llama", vocab_size=128256, hidden_size=4096,
                      intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, tie_word_embeddings=False), 1, 4092, 256, 16, 128)}
HERE = os.path.dirname(os.path.abspath(__file__))  # train.py runs from here
SAMPLINGS = {"greedy": {"temperature": 0.0},
             "sampled": {"temperature": 0.6, "top_p": 0.95, "top_k": 0}}
DECODE_MODES = ("ar", "lossless_auto", "lossless_full", "hf_generate")
# check_trained: the demo task (3-digit additions) learned by train.py until it drafts. name:
# (n_layer, n_embd, n_head, learning_rate, first round of steps, step cap, also decoded compiled);
# min_lr = lr / 10. The CPU one reaches tpf_tf 3.1 in 200 steps (~20 s on 2 cores)
TRAINED_SHAPES = {"cuda": {"demo": (4, 128, 4, 6e-3, 400, 1200, False),
                           "wide": (8, 768, 12, 1e-3, 400, 1200, True)},
                  "cpu": {"small": (2, 128, 4, 6e-3, 200, 600, False)}}


def build_model(cfg, attn, dev, dtype):
    cfg = dict(cfg)
    config = AutoConfig.for_model(cfg.pop("model_type"), max_position_embeddings=16384, **cfg)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype).to(dev)


def samples_for(n, length, prompt, vocab):
    """n random (prompt, response) token lists, the same for a seed."""
    g = torch.Generator().manual_seed(seed)
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


def example(prompt, response, B, mask_id, layout, offset=0):
    return data.build_example(prompt + response, [(len(prompt), len(prompt) + len(response))], B,
                              mask_id, layout, offset)


def padded_batch(examples, multiple, mask_id, dev):
    """The examples packed into rows of a length rounded up to multiple, on dev."""
    length = ceil_to(max(len(e["input_ids"]) for e in examples), multiple)
    return to_device(data.collate(examples, length, multiple, mask_id), dev)


# -------------------------------------------------------------------------------------------------
# train

def bench_train(cfg, dev, attn, samples, mask_id):
    """Seconds per optimizer step for the same samples: plain SFT, next-block in both layouts, and
    next-block with gated LoRA (base frozen, adapters on the masks: lora.py) instead of full
    fine-tuning."""
    peak, results = peak_flops(dev), {}
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    pad = 128 if attn == "flex_attention" else 8
    for name, B, layout, finetune in (("plain", 1, "split", "full"),
                                      ("split", block_size, "split", "full"),
                                      ("interleaved", block_size, "interleaved", "full"),
                                      ("split_gated_lora", block_size, "split", "gated_lora")):
        model = optimizer = None  # the last run's memory is free before this one's
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        model = build_model(cfg, attn, dev, torch.float32)
        if finetune == "gated_lora":
            lora.add_adapters(model, 16, 32.0)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=dev.type == "cuda")
        batch = padded_batch([example(p, r, B, mask_id, layout) for p, r in samples], pad, mask_id,
                             dev)
        supervised = (batch["labels"] != -100).sum()

        def step():
            with autocast:
                losses, _, _ = forward_losses(model, batch)  # builds the mask, as train.py
            (losses.sum() / supervised).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        seconds, memory = timed(step, dev, steps)
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

def hf_generate(model, prompts, eos, n_new, pad_id, how, compiled, seed_):
    """HF generate on a left-padded batch, greedy or sampled as SAMPLINGS[how] (its own draws:
    comparable to ours in distribution only); compiled: a static cache, which generate compiles
    itself on CUDA. Returns each row's tokens up to and including its first stop token, as our
    generate does."""
    dev = next(model.parameters()).device
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=dev)
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=dev)
    extra = {"cache_implementation": "static"} if compiled else {}
    if how == "sampled":
        torch.manual_seed(seed_)
        extra.update(SAMPLINGS["sampled"])
    out = model.generate(ids, attention_mask=attention, do_sample=how == "sampled",
                         max_new_tokens=n_new, pad_token_id=pad_id,
                         eos_token_id=sorted(eos) if eos else None, **extra)[:, width:].tolist()
    stops = eos or ()
    return [row[:next((i + 1 for i, t in enumerate(row) if t in stops), len(row))] for row in out]


def decode_once(model, part, first, mode, n_new, bs, how, compiled, d):
    """One mode on the prompts `part` (first: the index of part[0] among all prompts: seed + index
    is each prompt's seed), bs at a time: [(tokens, stats)]."""
    if mode == "hf_generate":
        return [(toks, {"tokens": len(toks), "forwards": len(toks)})
                for i in range(0, len(part), bs)
                for toks in hf_generate(model, part[i:i + bs], d["eos"], n_new, d["pad_id"], how,
                                        compiled and d["dev"].type == "cuda", seed + first + i)]
    kind, drafts = mode.partition("_")[::2]  # ar, lossless_auto, lossless_full
    drafts = d["B"] - 1 if drafts == "full" else "auto"
    return generate(model, part, kind, n_new, block_size=d["B"],
                    mask_token_id=d["mask_id"], eos_token_id=d["eos"], batch_size=bs,
                    drafts=drafts, seed=list(range(seed + first, seed + first + len(part))),
                    compile=compiled, **SAMPLINGS[how])


def bench_decode(model, prompts, d, n_new, batches, how, compiled=False, least=0):
    """ar, lossless (drafts 'auto' and all), HF generate on the same prompts at each batch size, one
    sampling setting. The modes take turns on chunks of the prompts, so that a change in the
    machine's load (a shared CPU) weighs on every mode alike; each batch size is warmed up first
    (lossless 'auto' calibrates per batch size; compile builds its graphs). d: eos, mask_id, B,
    pad_id, dev. With least, batch size bs decodes only the first max(least, 2 bs) prompts: about
    the same time at every size."""
    dev, out = d["dev"], {}
    sizes = [bs for bs in batches if bs <= len(prompts)]
    if len(sizes) < len(batches):
        print(f"decode: batch sizes above the {len(prompts)} prompts skipped: "
              f"{', '.join(str(bs) for bs in batches if bs > len(prompts))}", flush=True)
    for bs in sizes:
        used = prompts[:max(least, 2 * bs)] if least else prompts
        chunk = max(2 * bs, 8)
        parts = [(i, used[i:i + chunk]) for i in range(0, len(used), chunk)]
        warm = n_new if compiled else min(n_new, 8)  # compiled: the same cache shape as timed
        for rows in sorted({min(bs, len(p)) for _, p in parts}):
            for mode in DECODE_MODES:
                decode_once(model, used[:rows], 0, mode, warm, bs, how, compiled, d)
        res = {m: {"prompts": len(used), "tokens": 0, "forwards": 0, "seconds": 0.0}
               for m in DECODE_MODES}
        outputs, shapes = {m: [] for m in DECODE_MODES}, Counter()
        for first, part in parts:
            for mode in DECODE_MODES:
                synchronize(dev)
                t = time.perf_counter()
                decoded = decode_once(model, part, first, mode, n_new, bs, how, compiled, d)
                synchronize(dev)
                row = res[mode]
                row["seconds"] += time.perf_counter() - t
                row["tokens"] += sum(s["tokens"] for _, s in decoded)
                row["forwards"] += sum(s["forwards"] for _, s in decoded)
                outputs[mode] += [toks for toks, _ in decoded]
                if mode == "lossless_auto":
                    for _, stats in decoded:
                        shapes.update(stats["shapes"])
        for row in res.values():
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


def checkpoint_inputs(path, files, n, dev):
    """(model, prompts, decoding settings, folder) of a train.py checkpoint on the first n rows of
    files, as sample.py reads them: fp32 (lossless == ar exactly), its block size, mask token,
    chat template options and stop tokens."""
    model, tok, folder = load_for_decoding(path, dev)
    mask_id = getattr(model.config, "mask_token_id", None)
    if mask_id is None:
        raise UserError(f"{folder} has no mask token (config.mask_token_id): not trained by "
                        "train.py")
    conversation = chat.Chat(tok, getattr(model.config, "chat_template_kwargs", None) or {})
    rows = chat.read_rows(expand_files(files), require_target=False)[:n]
    prompts = [conversation.prompt_ids(chat.split_for_decoding(m, first)[0], tools)
               for m, first, tools, _ in rows]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    settings = {"eos": conversation.stop_ids(), "mask_id": mask_id, "pad_id": pad, "dev": dev,
                "B": getattr(model.config, "next_block_size", None) or block_size}
    return model, prompts, settings, folder


def decode_inputs(cfg, n_prompt, p_dec):
    """(model loader, prompts, decoding settings but dev, source) to decode: a trained checkpoint
    on its data (its own mask token, block size and stop tokens), or the random preset model on
    random prompts. Paths and data are read here, before any part runs, so that a typo costs
    nothing."""
    if not ckpt:
        prompts = [p for p, _ in samples_for(decode_samples or p_dec, n_prompt + 1, n_prompt,
                                             cfg["vocab_size"])]
        settings = {"eos": None, "mask_id": cfg["vocab_size"] - 1, "pad_id": 0, "B": block_size}
        return (lambda dev: build_model(cfg, "sdpa", dev, torch.float32).eval(), prompts,
                settings, "random preset")
    model, prompts, settings, folder = checkpoint_inputs(ckpt, data_files, decode_samples or 128,
                                                         torch.device("cpu"))
    del settings["dev"]
    return lambda dev: model.to(dev), prompts, settings, folder


def run_decode(model, prompts, d, n_new, batches, hows):
    """The decode part: each sampling setting's numbers, and its table."""
    out = {}
    for how in hows:
        out[how] = bench_decode(model, prompts, d, n_new, batches, how, compile)
        print(decode_table(out[how], f"decode, {how} ({len(prompts)} prompts, up to {n_new} new "
                           f"tokens, block size {d['B']}, {'compiled' if compile else 'eager'})"),
              flush=True)
    return out


# -------------------------------------------------------------------------------------------------
# data

def rss_mb():
    """This process's resident memory (MB), from /proc (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def bench_data(tok_path, n):
    """The data path on a synthetic reasoning corpus (n samples, targets of ~1,100 words in a
    <think> block): building the store (tokens/s), a warm start (the time and memory of finding and
    opening the store, counting what to drop, planning the batches, the first micro-batches),
    Batches.next per step, token-budget packing; and train.py's start before its first step, cold
    (building) and warm, with its peak memory."""
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq
    from chat import add_mask_token, load_tokenizer
    from demo import demo_tokenizer
    work = tempfile.mkdtemp(prefix="bench-data-")
    tok = load_tokenizer(tok_path) if tok_path else demo_tokenizer()
    add_mask_token(tok)
    rng = random.Random(seed)
    words = ("the of and to in is that for it as with was on be by this are from at or an have not "
             "which but they we all can more so if then add carry column sum digit").split()
    rows = [{"prompt": f"Question {i}: what is {rng.randint(1, 999)} + {rng.randint(1, 999)}?",
             "target": "<think>\n" + " ".join(rng.choice(words) for _ in range(1100))
             + f"\n</think>\n\nThe answer is {rng.randint(2, 1998)}."} for i in range(n)]
    path = os.path.join(work, "train.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    del rows
    conversation = chat.Chat(tok)
    store, _, built = load_store(path, conversation, os.path.join(work, "cache"))
    out = {"samples": len(store), "tokens": store.info["tokens"], "build_seconds": built,
           "build_tokens_per_s": store.info["tokens"] / built}
    del store
    gc.collect()
    before, t = rss_mb(), time.perf_counter()
    store, _, found = load_store(path, conversation, os.path.join(work, "cache"))
    keep, _, _ = data.too_long(store, 4096, block_size)
    batches = data.Batches(store.select(keep), 8, 1, 4096, block_size, 0, seed=seed)
    batches.next()
    out.update(warm_seconds=time.perf_counter() - t, warm_rss_growth_mb=rss_mb() - before,
               warm_found=found is None)
    t = time.perf_counter()
    for _ in range(20):
        micro = batches.next()
    out["next_ms"] = (time.perf_counter() - t) / 20 * 1e3
    out["next_tokens"] = int((micro[0]["doc_ids"] >= 0).sum())
    budget = data.Batches(store.select(keep), 0, 1, 4096, block_size, 0, seed=seed,
                          batch_tokens=16384)
    lengths = data.example_lengths(budget.samples, block_size, budget._epoch_plan(0)[1])
    real = [sum(min(lengths[i], 4096) for row in mb for i in row) for mb in budget._plan(0)]
    out.update(batch_tokens_padding=budget.padding(),
               batch_tokens_max_over_min=max(real) / min(real))
    print(f"data: {out['samples']} samples, {out['tokens']:,} tokens | store built at "
          f"{out['build_tokens_per_s'] / 1e3:.0f}k tokens/s | warm start {out['warm_seconds']:.2f} "
          f"s, RSS +{out['warm_rss_growth_mb']:.0f} MB | Batches.next {out['next_ms']:.1f} ms for "
          f"{out['next_tokens']} tokens | batch_tokens: padding "
          f"{100 * out['batch_tokens_padding']:.1f}%, max/min tokens "
          f"{out['batch_tokens_max_over_min']:.2f}", flush=True)
    if tok_path:  # train.py itself, a tiny model of this tokenizer's vocabulary: start-up, peak RSS
        tiny = dict(PRESETS["tiny"][0], vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16)
        build_model(tiny, "sdpa", torch.device("cpu"), torch.float32).save_pretrained(
            os.path.join(work, "model"))
        load_tokenizer(tok_path).save_pretrained(os.path.join(work, "model"))
        probe = ("import resource, subprocess, sys, time; t = time.time(); "
                 "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
                 "print(time.time() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
                 "p.returncode); print(p.stdout); print(p.stderr)")
        for start in ("cold", "warm"):
            args = [sys.executable, os.path.join(HERE, "train.py"), "--device=cpu",
                    f"--init_from={work}/model", f"--train_files={path}", "--val_files=None",
                    "--demo_data=False", "--max_steps=1", "--batch_size=1", "--max_length=2048",
                    f"--out_dir={work}/out_{start}", f"--data_cache={work}/train_cache"]
            p = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True)
            seconds, peak, rc = p.stdout.split("\n")[0].split()
            step = next((float(line.split("|")[-1].split("k tok/s")[0])
                         for line in p.stdout.splitlines() if line.startswith("step 1/1")), None)
            out[f"train_{start}_seconds"] = float(seconds)
            out[f"train_{start}_peak_rss_mb"] = int(peak) / 1024
            print(f"data: train.py start, {start}: {float(seconds):.1f} s in all (one step of "
                  f"{step}k tok/s included), peak RSS {int(peak) / 1024:.0f} MB, exit {rc}",
                  flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return out


# -------------------------------------------------------------------------------------------------
# checks

def _loss_and_grads(cfg, attn, dev, batch, bf16):
    """Per-token losses and (with autograd on CUDA) all gradients, flattened, of one
    forward+backward."""
    model = build_model(cfg, attn, dev, torch.float32)
    backward = dev.type == "cuda"  # FlexAttention has no backward on CPU: the dry run checks the
    #                                forward only
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16), \
            torch.set_grad_enabled(backward):
        loss, _, _ = forward_losses(model, batch)
    if not backward:
        return loss.float(), None
    loss.mean().backward()
    return loss.detach().float(), torch.cat([p.grad.flatten().float() for p in model.parameters()
                                             if p.grad is not None])


def check_flex(cfg, dev, samples, mask_id):
    """The FlexAttention BlockMask path against the dense SDPA path, both layouts, on the preset's
    attention shape (its first 4 layers, 2 samples). The reference is dense in fp32. Flex in fp32
    must match it to 1e-3 (a mask bug shows here: one wrongly visible key per mask gives 2e-2 on the
    tiny preset); flex under bf16 autocast, as training runs, must be no further from it than dense
    under bf16 autocast is (2x, or 1e-2 / 5e-2, whichever is larger). On CPU: forward only."""
    cfg = dict(cfg, num_hidden_layers=min(4, cfg["num_hidden_layers"]))
    report, failures = {}, []

    def rel(a, b):  # relative to b's spread: random-weight losses all sit near log(vocab)
        return None if a is None else ((a - b).norm() / (b - b.mean()).norm()).item()

    for layout in ("split", "interleaved"):
        batch = padded_batch([example(p, r, block_size, mask_id, layout, s % block_size)
                              for s, (p, r) in enumerate(samples[:2])], 128, mask_id, dev)
        ref = _loss_and_grads(cfg, "sdpa", dev, batch, bf16=False)
        runs, r = {}, {}
        for run, attn, bf16 in (("flex_fp32", "flex_attention", False),
                                ("flex_bf16", "flex_attention", True),
                                ("dense_bf16", "sdpa", True)):
            try:
                runs[run] = _loss_and_grads(cfg, attn, dev, batch, bf16)
            except Exception as e:  # a kernel that does not fit this GPU: the others still run
                traceback.print_exc()
                r[f"{run}_error"] = f"{type(e).__name__}: {e}"[:1000]
        r.update({f"{run}_{kind}_rel_diff": rel(got[i], ref[i]) for run, got in runs.items()
                  for i, kind in enumerate(("loss", "grad"))})
        ok = len(runs) == 3 and r["flex_fp32_loss_rel_diff"] < 1e-3 and \
            r["flex_bf16_loss_rel_diff"] <= max(2 * r["dense_bf16_loss_rel_diff"], 1e-2)
        if ok and ref[1] is not None:
            ok = r["flex_fp32_grad_rel_diff"] < 1e-3 and \
                r["flex_bf16_grad_rel_diff"] <= max(2 * r["dense_bf16_grad_rel_diff"], 5e-2)
        r["ok"] = ok
        report[layout] = r
        diffs = ", ".join(f"{k.replace('_rel_diff', '')} {v:.1e}" for k, v in r.items()
                          if isinstance(v, float))
        print(f"check flex vs dense ({layout}, rows {tuple(batch['input_ids'].shape)}, relative to "
              f"dense fp32): {diffs} -> {'ok' if ok else 'FAIL'}"
              + ("" if ref[1] is not None else " (CPU: forward only)"), flush=True)
        if not ok:
            failures.append(f"flex vs dense {layout}")
    report["failures"] = failures
    return report


def check_decoding(cfg, dev, samples, mask_id):
    """In fp32 on the preset model: lossless (drafts 'auto') == ar for every prompt, greedy and
    sampled (the same draws), and every mode decodes each prompt of a batch (prompts of different
    lengths, more prompts than rows) exactly as it decodes that prompt alone: the same tokens in
    the same forwards (lossless with every draft verified: 'auto' chooses by measured time)."""
    model = build_model(cfg, "sdpa", dev, torch.float32).eval()
    prompts = [p[:8 + 7 * i] for i, (p, _) in enumerate(samples)]
    n, opts = len(prompts), dict(block_size=block_size, mask_token_id=mask_id)
    full = {"lossless": block_size - 1}
    alone = {m: [generate(model, p, m, 32, drafts=full.get(m, "auto"), **opts) for p in prompts]
             for m in ("ar", "block", "adaptive", "lossless")}
    report, failures = {}, []
    for how in SAMPLINGS:
        ar, auto = (generate(model, prompts, m, 32, batch_size=2, seed=seed, **SAMPLINGS[how],
                             **opts) for m in ("ar", "lossless"))
        same = sum(a[0] == b[0] for a, b in zip(auto, ar))
        report["lossless_equals_ar" + ("_sampled" if how == "sampled" else "")] = f"{same}/{n}"
        if same != n:
            failures.append(f"lossless == ar ({how})")
    for mode, ref in alone.items():
        batched = generate(model, prompts, mode, 32, batch_size=max(1, n // 2),
                           drafts=full.get(mode, "auto"), compile=compile, **opts)
        equal = sum(a == b for a, b in zip(batched, ref))
        report[f"batched_{mode}_equals_alone"] = f"{equal}/{n}"
        if equal != n:
            failures.append(f"batched {mode} == alone")
    print("check decoding (fp32): " + ", ".join(f"{k} {v}" for k, v in report.items())
          + f" -> {'ok' if not failures else 'FAIL'}", flush=True)
    report["failures"] = failures
    return report


def train_demo(work, out, files, args, steps):
    """train.py on the demo data as a subprocess (it resumes out's run, up to `steps`): the last
    eval row of its metrics.jsonl. Its output goes to out.log; a failure raises with its tail."""
    cmd = [sys.executable, "train.py", f"--out_dir={out}", f"--data_cache={work}/cache",
           f"--train_files={files['train']}", f"--val_files={files['test']}", "--demo_data=False",
           f"--block_size={block_size}", "--keep_last=1", f"--max_steps={steps}", *args]
    with open(f"{out}.log", "a") as log:
        rc = subprocess.run(cmd, cwd=HERE, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc:
        with open(f"{out}.log") as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"train.py exited {rc}: {' '.join(cmd)}\n{tail}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "tpf_tf" in r][-1]


def check_trained(dev, saved=lambda report: None):
    """A model that drafts, measured: train.py trains each shape of TRAINED_SHAPES on the demo task
    (3-digit additions), in rounds of more steps (train.py resumes its out_dir), until the held-out
    tpf_tf reaches check_tpf or the step cap; then its held-out prompts are decoded greedily by ar,
    lossless (auto and full) and HF generate at each batch size, eager, and (the wide shape on
    CUDA) compiled at the batch sizes of check_compiled. Lossless must equal ar. saved(report)
    after each shape: a partial result is kept."""
    cuda = dev.type == "cuda"
    work = tempfile.mkdtemp(prefix="bench-trained-")
    n = check_samples or (128 if cuda else 32)
    n_new = max_new_tokens or 96  # a demo answer is ~70 tokens
    files = write_demo_data(os.path.join(work, "data"), n_test=max(n, 64))
    report, failures = {}, []
    for name, shape in TRAINED_SHAPES[dev.type].items():
        n_layer, n_embd, n_head, lr, first, cap, compiled = shape
        r = report[name] = {"n_layer": n_layer, "n_embd": n_embd, "n_head": n_head,
                            "learning_rate": lr, "rounds": []}
        try:
            args = [f"--device={dev.type}", f"--n_layer={n_layer}", f"--n_embd={n_embd}",
                    f"--n_head={n_head}", f"--learning_rate={lr}", f"--min_lr={lr / 10}",
                    "--log_every=50", "--attention=sdpa"]  # no FlexAttention compile per start:
            #                                                check_flex checks flex
            target, t = check_steps or first, time.perf_counter()
            while True:
                row = train_demo(work, os.path.join(work, name), files, args, target)
                r["rounds"].append({"steps": target, "tpf_tf": row["tpf_tf"]})
                print(f"check trained {name} ({n_layer} layers x {n_embd}, lr {lr:g}): "
                      f"{target} steps, held-out tpf_tf {row['tpf_tf']:.2f}", flush=True)
                if row["tpf_tf"] >= check_tpf or check_steps or target >= cap:
                    break
                target = min(cap, 2 * target)
            acc = {k: v for k, v in row.items() if k.startswith("acc@")}
            r.update(steps=target, tpf_tf=row["tpf_tf"], acc=acc,
                     train_seconds=time.perf_counter() - t)
            if row["tpf_tf"] < check_tpf:
                failures.append(f"trained {name}: tpf_tf {row['tpf_tf']:.2f} < {check_tpf:g} "
                                f"after {target} steps")
            model, prompts, d, _ = checkpoint_inputs(os.path.join(work, name), files["test"], n,
                                                     dev)
            r["params"] = sum(p.numel() for p in model.parameters())
            variants = [("eager", False, list(decode_batches))]
            if compiled and check_compiled:
                variants.append(("compiled", True, list(check_compiled)))
            for variant, fixed, sizes in variants:
                r[variant] = bench_decode(model, prompts, d, n_new, sizes, "greedy", fixed,
                                          least=16)
                print(decode_table(r[variant], f"check trained {name} ({r['params'] / 1e6:.1f}M "
                                   f"params, tpf_tf {r['tpf_tf']:.2f}), greedy, {variant}, "
                                   "held-out prompts"), flush=True)
                for batch, res in r[variant].items():
                    for mode in ("lossless_auto", "lossless_full"):
                        if res[mode]["same_as_ar"] != res[mode]["prompts"]:
                            failures.append(f"trained {name} {variant} {batch} {mode} == ar")
            del model
        except Exception:
            traceback.print_exc()
            r["error"] = traceback.format_exc()
            failures.append(f"trained {name} crashed")
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        report["failures"] = failures
        saved(report)
    shutil.rmtree(work, ignore_errors=True)
    print(f"check trained -> {'FAIL: ' + '; '.join(failures) if failures else 'ok'}",
          flush=True)
    return report


def check_tensor_parallel(dev):
    """train.py under torchrun with tensor_parallel=2 on 2 GPUs, 3 steps of the demo shape: its exit
    code and losses. Skipped with fewer GPUs."""
    gpus = torch.cuda.device_count() if dev.type == "cuda" else 0
    if gpus < 2:
        why = f"{gpus} GPU" if gpus else "CPU"
        print(f"tensor parallel: skipped ({why})", flush=True)
        return {"skipped": why, "failures": []}
    work = tempfile.mkdtemp(prefix="bench-tp-")
    files = write_demo_data(os.path.join(work, "data"), n_train=256, n_test=16)
    out = os.path.join(work, "out")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "train.py", "--device=cuda", f"--out_dir={out}", f"--data_cache={work}/cache",
           f"--train_files={files['train']}", "--val_files=None", "--demo_data=False",
           "--attention=sdpa", "--tensor_parallel=2", "--max_steps=3", "--log_every=1"]
    p = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=300)
    try:
        with open(os.path.join(out, "metrics.jsonl")) as f:
            losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    except OSError:
        losses = []
    ok = p.returncode == 0 and len(losses) == 3
    report = {"exit_code": p.returncode, "losses": losses, "ok": ok,
              "failures": [] if ok else [f"tensor parallel train.py exit {p.returncode}"]}
    if not ok:
        report["output"] = (p.stdout + p.stderr)[-3000:]
    print(f"tensor parallel (2 GPUs, train.py --tensor_parallel=2, 3 steps): exit {p.returncode}, "
          f"losses {', '.join(f'{x:.3f}' for x in losses)} -> {'ok' if ok else 'FAIL'}", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return report


# -------------------------------------------------------------------------------------------------
if __name__ == "__main__":
    dev = resolve_device(device)
    name = one_of("preset", preset if preset != "auto" else
                  ("qwen3-0.6b" if dev.type == "cuda" else "tiny"), tuple(PRESETS))
    at_least("block_size", block_size, 1)
    at_least("steps", steps, 1)
    parts = what.split(",")
    for part in parts:
        one_of("what", part, ("train", "decode", "data", "none"))
    hows = sampling.split(",")
    for how in hows:
        one_of("sampling", how, tuple(SAMPLINGS))
    for key in ("decode_batches", "check_compiled"):
        if not all(isinstance(b, int) and b >= 1 for b in globals()[key]):
            raise UserError(f"{key}={globals()[key]!r}: expected ints >= 1, e.g. --{key}=1,8,32")
    for key in ("check_steps", "check_samples", "max_new_tokens", "decode_samples"):
        at_least(key, globals()[key], 0)
    cfg, p_rows, p_len, p_prompt, p_dec, p_new = PRESETS[name]
    n_rows, length, n_prompt = rows or p_rows, seq_len or p_len, prompt_len or p_prompt
    attn = attention_backend(attention, dev, training=True)
    mask_id = cfg["vocab_size"] - 1
    machine = torch.cuda.get_device_name(dev) if dev.type == "cuda" else \
        f"CPU ({torch.get_num_threads()} threads)"
    print(f"bench.py | {machine} | torch {torch.__version__} | transformers "
          f"{transformers.__version__} | preset {name} | attention {attn} | block_size "
          f"{block_size}", flush=True)
    out = {"machine": machine, "torch": torch.__version__,
           "transformers": transformers.__version__, "preset": name, "attention": attn,
           "block_size": block_size, "gradient_checkpointing": gradient_checkpointing,
           "seconds": {}}
    samples = samples_for(n_rows, length, n_prompt, cfg["vocab_size"])
    if "decode" in parts:
        load, prompts, decoding, out["decode_model"] = decode_inputs(cfg, n_prompt, p_dec)
        out.update(decode_prompts=len(prompts), decode_max_new_tokens=max_new_tokens or p_new,
                   decode_block_size=decoding["B"], decode_compiled=compile)
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
        none. A part's own failed checks are in its "failures"."""
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

    def partial(part):
        """A report so far of a long part, kept in the JSON."""
        def keep(report):
            out[part] = report
            save()
        return keep

    if check:
        short = samples_for(5, 48, 40, cfg["vocab_size"])
        section("check_flex", lambda: check_flex(cfg, dev, samples, mask_id))
        section("check_decoding", lambda: check_decoding(cfg, dev, short, mask_id))
        section("check_trained", lambda: check_trained(dev, partial("check_trained")))
        section("check_tensor_parallel", lambda: check_tensor_parallel(dev))
    if "train" in parts:
        section("train", lambda: bench_train(cfg, dev, attn, samples, mask_id))
    if "data" in parts:
        section("data", lambda: bench_data(tokenizer, data_samples))
    if "decode" in parts:
        section("decode", lambda: run_decode(load(dev), prompts, dict(decoding, dev=dev),
                                             max_new_tokens or p_new, list(decode_batches), hows))
    if failures:
        print(f"FAILED: {', '.join(failures)}")
        sys.exit(1)
