"""
Speed, measured side by side in one run: ratios on the same samples and the same model, never
absolute claims.

  python bench.py                        # CPU-sized: a tiny random model, dense mask (SDPA)
  python bench.py --preset=qwen3-0.6b    # CUDA: Qwen3-0.6B's shape, random weights (no download)
  python bench.py --check=True --summary_json=b.json   # CUDA: correctness checks, then benchmarks
  python bench.py --what=decode --ckpt=out/demo        # a trained checkpoint on its own data

train:  one optimizer step (forward, backward, AdamW) on the same samples as (a) plain SFT: clean
        tokens, causal; (b) next-block SFT, split layout; (c) interleaved layout. Time, tokens/s
        (clean and total), peak memory, the ratios b/a and c/a, MFU on known GPUs.
decode: ar, adaptive, lossless and HF generate on the same model and prompts, at each batch size of
        decode_batches: tokens/s, tokens per forward, speedup over ar at the same batch size and
        over ar at batch 1, and whether each output equals ar's.
check:  the BlockMask path equals the dense path (loss and gradients, fp32 and bf16; forward only on
        CPU), lossless == ar in fp32, and batched decoding == one prompt at a time for every mode.
Every part runs even when an earlier one crashed (its traceback is printed and kept in the JSON,
which is rewritten after each part); a failed check or a crash makes the exit code 1.
"""

import gc
import json
import os
import shutil
import statistics
import sys
import time
import traceback

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

import chat
import data
import lora
from checkpoint import load_for_decoding
from common import resolve_device
from configurator import UserError, at_least, configure, one_of
from model import attention_backend, flops_per_token, forward_losses, peak_flops
from sample import generate

# -------------------------------------------------------------------------------------------------
# config (python bench.py [config.py] --key=value)
preset = "auto"                  # 'auto' (tiny on CPU, qwen3-0.6b on CUDA), 'tiny', 'qwen3-0.6b',
#                                  'qwen3-8b', 'llama-8b'
what = "train,decode"            # benchmarks: 'train', 'decode', 'data' (a list), or 'none'
check = False                    # correctness checks first (meant for CUDA; CPU: no flex backward)
rows = 0                         # train: samples per step, one per row; 0 = preset's
seq_len = 0                      # train: clean tokens per sample (prompt + response); 0 = preset's
prompt_len = 0                   # tokens of each prompt; 0 = preset's
block_size = 4                   # next-block size
steps = 5                        # timed train steps (after 2 warm-up steps), median reported
gradient_checkpointing = False   # recompute activations in backward (memory vs time)
ckpt = ""                        # decode: a train.py checkpoint or out_dir (else the preset model)
data_files = "data/demo/test.parquet"  # decode with ckpt: prompts from this parquet
decode_samples = 0               # decode: prompts; 0 = preset's
decode_batches = (1, 8, 32, 64)  # decode: the batch sizes to measure (--decode_batches=1,8)
max_new_tokens = 0               # decode: tokens per prompt; 0 = preset's
threshold = 0.7                  # adaptive decoding threshold
compile = False                  # decode: torch.compile our decoding step and HF generate's forward
tokenizer = ""                   # data: a model folder whose tokenizer to use; '' = the demo's
data_samples = 2000              # data: synthetic reasoning samples (~1.4k tokens with a BPE)
device = "auto"                  # 'auto', 'cpu', 'cuda'
attention = "auto"               # train: 'auto' (flex on CUDA, else sdpa), 'flex', 'sdpa'
summary_json = ""                # write every number here
seed = 0                         # random model and data
# -------------------------------------------------------------------------------------------------
if __name__ == "__main__":
    config = configure(globals())

PRESETS = {  # (model config, rows, seq_len, prompt_len, decode samples, new tokens)
    "tiny": (
        dict(model_type="qwen3", vocab_size=2048, hidden_size=256, intermediate_size=768,
             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
             tie_word_embeddings=True),
        2, 508, 60, 8, 64),
    "qwen3-0.6b": (
        dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
             num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
             tie_word_embeddings=True),
        4, 4092, 256, 64, 128),
    "qwen3-8b": (
        dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
             num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
             tie_word_embeddings=False),
        1, 4092, 256, 16, 128),
    "llama-8b": (
        dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
             num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
             tie_word_embeddings=False),
        1, 4092, 256, 16, 128),
}
DECODE_MODES = ("ar", "adaptive", "lossless", "hf_generate")


def build_model(cfg, attn, dev, dtype):
    cfg = dict(cfg)
    config = AutoConfig.for_model(cfg.pop("model_type"), max_position_embeddings=16384, **cfg)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype).to(dev)


def samples_for(n, length, prompt, vocab):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randint(1, vocab - 1, (prompt,), generator=g).tolist(),
            torch.randint(1, vocab - 1, (length - prompt,), generator=g).tolist(),
        )
        for _ in range(n)
    ]


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
    return data.build_example(
        prompt + response, [(len(prompt), len(prompt) + len(response))], B, mask_id, layout, offset
    )


def bench_train(cfg, dev, attn, samples, mask_id):
    """Seconds per optimizer step for the same samples: plain SFT, next-block in both layouts, and
    next-block with gated LoRA (base frozen, adapters on the masks: lora.py) instead of full
    fine-tuning."""
    peak, results = peak_flops(dev), {}
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    pad = 128 if attn == "flex_attention" else 8
    for name, B, layout, finetune in (
        ("plain", 1, "split", "full"),
        ("split", block_size, "split", "full"),
        ("interleaved", block_size, "interleaved", "full"),
        ("split_gated_lora", block_size, "split", "gated_lora"),
    ):
        model = optimizer = None  # the last run's memory is free before this one's
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        model = build_model(cfg, attn, dev, torch.float32)
        if finetune == "gated_lora":
            lora.add_adapters(model, 16, 32.0)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=dev.type == "cuda")
        examples = [example(p, r, B, mask_id, layout) for p, r in samples]
        length = max(len(e["input_ids"]) for e in examples)
        batch = data.collate(examples, -(-length // pad) * pad, pad_multiple=pad, pad_id=mask_id)
        batch = {k: v.to(dev) for k, v in batch.items() if isinstance(v, torch.Tensor)}
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
        state_bytes = sum(
            t.numel() * t.element_size()
            for s in optimizer.state.values()
            for t in s.values()
            if torch.is_tensor(t) and t.dim() > 0
        )
        row = {
            "seconds": seconds,
            "rows": batch["input_ids"].shape[0],
            "row_length": batch["input_ids"].shape[1],
            "clean_tokens": clean,
            "total_tokens": total,
            "clean_tokens_per_s": clean / seconds,
            "total_tokens_per_s": total / seconds,
            "peak_memory_gb": memory / 2**30 if memory else None,
            "trainable_params": n_trainable,
            "optimizer_state_mb": state_bytes / 2**20,
        }
        if peak:
            row["mfu"] = (
                flops_per_token(model, batch["input_ids"].shape[1]) * total / seconds / peak
            )
        results[name] = row
        print(
            f"train {name:16s} {seconds:.4f} s/step | {clean / seconds:9.0f} clean tok/s | "
            f"{total / seconds:9.0f} total tok/s | rows {row['rows']} x {row['row_length']} | "
            f"trainable {n_trainable / 1e6:.2f}M, AdamW state {row['optimizer_state_mb']:.1f} MiB"
            + (f" | peak {row['peak_memory_gb']:.1f} GiB" if memory else "")
            + (f" | mfu {100 * row['mfu']:.0f}%" if peak else ""),
            flush=True,
        )
    for name in ("split", "interleaved"):
        results[f"{name}_vs_plain_time"] = results[name]["seconds"] / results["plain"]["seconds"]
        if results["plain"]["peak_memory_gb"]:
            results[f"{name}_vs_plain_memory"] = (
                results[name]["peak_memory_gb"] / results["plain"]["peak_memory_gb"]
            )
    results["gated_lora_vs_full_time"] = (
        results["split_gated_lora"]["seconds"] / results["split"]["seconds"]
    )
    if results["split"]["peak_memory_gb"]:
        results["gated_lora_vs_full_memory"] = results["split_gated_lora"]["peak_memory_gb"] / \
            results["split"]["peak_memory_gb"]
    memory = (
        (
            f"; memory split/plain {results['split_vs_plain_memory']:.2f}x, gated LoRA/full "
            f"{results['gated_lora_vs_full_memory']:.2f}x"
        )
        if "split_vs_plain_memory" in results
        else ""
    )
    print(
        f"train ratios: split/plain {results['split_vs_plain_time']:.2f}x time, interleaved/plain "
        f"{results['interleaved_vs_plain_time']:.2f}x time, gated LoRA/full "
        f"{results['gated_lora_vs_full_time']:.2f}x time{memory}",
        flush=True,
    )
    return results


def hf_generate(model, prompts, eos, n_new, pad_id):
    """HF generate, greedy, left-padded batch (a static cache, compiled, on CUDA with compile=True).
    Returns each row's tokens up to and including its first stop token, as our generate does."""
    dev = next(model.parameters()).device
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=dev)
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=dev)
    extra = {"cache_implementation": "static"} if compile and dev.type == "cuda" else {}
    out = model.generate(
        ids, attention_mask=attention, do_sample=False, max_new_tokens=n_new, pad_token_id=pad_id,
        eos_token_id=sorted(eos) if eos else None, **extra
    )[:, width:].tolist()
    results = []
    for row in out:
        stop = next((i + 1 for i, t in enumerate(row) if t in (eos or ())), len(row))
        results.append(row[:stop])
    return results


def bench_decode(model, prompts, mask_id, eos, n_new, dev, B, batches, pad_id):
    """ar, adaptive, lossless and HF generate on the same prompts at each batch size. The modes take
    turns on chunks of the prompts, so that a change in the machine's load (a shared CPU) weighs on
    every mode alike.
    """
    out = {}
    # warm-up
    generate(model, prompts[:2], "lossless", B, mask_id, 8, eos, threshold, 2, compile=compile)
    for bs in batches:
        res = {m: {"tokens": 0, "forwards": 0, "seconds": 0.0, "outputs": []} for m in DECODE_MODES}
        chunk = max(4 * bs, 8)
        for start in range(0, len(prompts), chunk):
            part = prompts[start:start + chunk]
            for mode in DECODE_MODES:
                synchronize(dev)
                t = time.perf_counter()
                if mode == "hf_generate":
                    new = [
                        hf_generate(model, part[i : i + bs], eos, n_new, pad_id)
                        for i in range(0, len(part), bs)
                    ]
                    decoded = [
                        (toks, {"tokens": len(toks), "forwards": len(toks)})
                        for grp in new
                        for toks in grp
                    ]
                else:
                    decoded = generate(
                        model, part, mode, B, mask_id, n_new, eos, threshold, bs, compile=compile
                    )
                synchronize(dev)
                row = res[mode]
                row["seconds"] += time.perf_counter() - t
                row["tokens"] += sum(s["tokens"] for _, s in decoded)
                row["forwards"] += sum(s["forwards"] for _, s in decoded)
                row["outputs"] += [toks for toks, _ in decoded]
        for mode, row in res.items():
            row["tokens_per_s"] = row["tokens"] / row["seconds"]
            row["tokens_per_forward"] = row["tokens"] / row["forwards"]
        ar_outputs = res["ar"]["outputs"]
        for mode, row in res.items():
            row["speedup_vs_ar"] = row["tokens_per_s"] / res["ar"]["tokens_per_s"]
            row["same_as_ar"] = sum(a == b for a, b in zip(row.pop("outputs"), ar_outputs))
        out[f"batch_{bs}"] = res
    base = out[f"batch_{batches[0]}"]["ar"]["tokens_per_s"]
    print(
        f"decode ({len(prompts)} prompts, up to {n_new} new tokens, block size {B}; "
        f"'vs ar@{batches[0]}' is against ar at batch {batches[0]})",
        flush=True,
    )
    for bs in batches:
        for mode, row in out[f"batch_{bs}"].items():
            row[f"speedup_vs_ar_batch_{batches[0]}"] = row["tokens_per_s"] / base
            print(
                f"decode batch {bs:3d} {mode:11s} {row['tokens_per_s']:9.1f} tok/s | "
                f"{row['tokens_per_forward']:.2f} tok/forward | "
                f"vs ar {row['speedup_vs_ar']:.2f}x | "
                f"vs ar@{batches[0]} {row[f'speedup_vs_ar_batch_{batches[0]}']:.2f}x | same as ar "
                f"{row['same_as_ar']}/{len(prompts)}",
                flush=True,
            )
    return out


def rss_mb():
    """This process's resident memory (MB), from /proc (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def bench_data(tok_path, n, dev):
    """The data path on a synthetic reasoning corpus (n samples, targets of ~1,100 words in a
    <think> block): building the store (tokens/s), a warm start (the time and memory of finding and
    opening the store, counting what to drop, planning the batches, the first micro-batches),
    Batches.next per step, token-budget packing; and train.py's start before its first step, cold
    (building) and warm, with its peak memory."""
    import random
    import subprocess
    import tempfile

    import pyarrow as pa
    import pyarrow.parquet as pq
    from model import add_mask_token, demo_tokenizer, load_tokenizer
    work = tempfile.mkdtemp(prefix="bench-data-")
    tok = load_tokenizer(tok_path) if tok_path else demo_tokenizer()
    add_mask_token(tok)
    rng = random.Random(seed)
    words = (
        "the of and to in is that for it as with was on be by this are from at or an have not "
        "which but they we all can more so if then add carry column sum digit"
    ).split()
    rows = [
        {
            "prompt": f"Question {i}: what is {rng.randint(1, 999)} + {rng.randint(1, 999)}?",
            "target": "<think>\n"
            + " ".join(rng.choice(words) for _ in range(1100))
            + "\n</think>\n\nThe answer is "
            f"{rng.randint(2, 1998)}.",
        }
        for i in range(n)
    ]
    path = os.path.join(work, "train.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    del rows
    conversation = chat.Chat(tok)
    store, _, built = data.load_store(path, conversation, os.path.join(work, "cache"))
    out = {"samples": len(store), "tokens": store.info["tokens"], "build_seconds": built,
           "build_tokens_per_s": store.info["tokens"] / built}
    del store
    gc.collect()
    before, t = rss_mb(), time.perf_counter()
    store, _, found = data.load_store(path, conversation, os.path.join(work, "cache"))
    keep, _, _ = data.too_long(store, 4096, block_size)
    batches = data.Batches(store.select(keep), 8, 1, 4096, block_size, 0, seed=seed)
    batches.next()
    out.update(
        warm_seconds=time.perf_counter() - t,
        warm_rss_growth_mb=rss_mb() - before,
        warm_found=found is None,
    )
    t = time.perf_counter()
    for _ in range(20):
        micro = batches.next()
    out["next_ms"] = (time.perf_counter() - t) / 20 * 1e3
    out["next_tokens"] = int((micro[0]["doc_ids"] >= 0).sum())
    budget = data.Batches(
        store.select(keep), 0, 1, 4096, block_size, 0, seed=seed, batch_tokens=16384
    )
    lengths = data.example_lengths(budget.samples, block_size, budget._epoch_plan(0)[1])
    real = [sum(min(lengths[i], 4096) for row in mb for i in row) for mb in budget._plan(0)]
    out.update(
        batch_tokens_padding=budget.padding(), batch_tokens_max_over_min=max(real) / min(real)
    )
    print(
        f"data: {out['samples']} samples, {out['tokens']:,} tokens | store built at "
        f"{out['build_tokens_per_s'] / 1e3:.0f}k tokens/s | "
        f"warm start {out['warm_seconds']:.2f} s, "
        f"RSS +{out['warm_rss_growth_mb']:.0f} MB | Batches.next {out['next_ms']:.1f} ms for "
        f"{out['next_tokens']} tokens | "
        f"batch_tokens: padding {100 * out['batch_tokens_padding']:.1f}%, max/min tokens "
        f"{out['batch_tokens_max_over_min']:.2f}",
        flush=True,
    )
    if tok_path:  # train.py itself, a tiny model of this tokenizer's vocabulary: start-up, peak RSS
        model = build_model(
            dict(
                PRESETS["tiny"][0], vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16
            ),
            "sdpa",
            torch.device("cpu"),
            torch.float32,
        )
        model.save_pretrained(os.path.join(work, "model"))
        load_tokenizer(tok_path).save_pretrained(os.path.join(work, "model"))
        for start in ("cold", "warm"):
            args = [
                sys.executable,
                os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py"),
                "--device=cpu",
                f"--init_from={work}/model",
                f"--train_files={path}",
                "--val_files=None",
                "--demo_data=False",
                "--max_steps=1",
                "--batch_size=1",
                "--max_length=2048",
                f"--out_dir={work}/out_{start}",
                f"--data_cache={work}/train_cache",
            ]
            probe = (
                "import resource, subprocess, sys, time; t = time.time(); "
                "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
                "print(time.time() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
                "p.returncode); print(p.stdout); print(p.stderr)"
            )
            p = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True)
            seconds, peak, rc = p.stdout.split("\n")[0].split()
            step = next(
                (
                    float(line.split("|")[-1].split("k tok/s")[0])
                    for line in p.stdout.splitlines()
                    if line.startswith("step 1/1")
                ),
                None,
            )
            out[f"train_{start}_seconds"], out[f"train_{start}_peak_rss_mb"] = (
                float(seconds),
                int(peak) / 1024,
            )
            print(
                f"data: train.py start, {start}: {float(seconds):.1f} s in all "
                f"(one step of {step}k tok/s included), "
                f"peak RSS {int(peak) / 1024:.0f} MB, exit {rc}",
                flush=True,
            )
    shutil.rmtree(work, ignore_errors=True)
    return out


def _loss_and_grads(cfg, attn, dev, batch, bf16):
    """Per-token losses and (with autograd on CUDA) all gradients, flattened, of one
    forward+backward."""
    model = build_model(cfg, attn, dev, torch.float32)
    # FlexAttention has no backward on CPU: the dry run checks the forward only
    backward = dev.type == "cuda"
    bf16_autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)
    with bf16_autocast, torch.set_grad_enabled(backward):
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
        examples = [
            example(p, r, block_size, mask_id, layout, s % block_size)
            for s, (p, r) in enumerate(samples[:2])
        ]
        L = -(-max(len(e["input_ids"]) for e in examples) // 128) * 128
        batch = {k: v.to(dev) for k, v in data.collate(examples, L, 128, mask_id).items()
                 if isinstance(v, torch.Tensor)}
        ref = _loss_and_grads(cfg, "sdpa", dev, batch, bf16=False)
        runs, r = {}, {}
        for run, attn, bf16 in (
            ("flex_fp32", "flex_attention", False),
            ("flex_bf16", "flex_attention", True),
            ("dense_bf16", "sdpa", True),
        ):
            try:
                runs[run] = _loss_and_grads(cfg, attn, dev, batch, bf16)
            except (
                Exception
            ) as e:  # e.g. a kernel that does not fit this GPU: this run fails, the others still go
                traceback.print_exc()
                r[f"{run}_error"] = f"{type(e).__name__}: {e}"[:1000]
        r.update({f"{run}_{kind}_rel_diff": rel(got[i], ref[i]) for run, got in runs.items()
                  for i, kind in enumerate(("loss", "grad"))})
        ok = len(runs) == 3
        if ok:
            ok = (r["flex_fp32_loss_rel_diff"] < 1e-3
                  and r["flex_bf16_loss_rel_diff"] <= max(2 * r["dense_bf16_loss_rel_diff"], 1e-2))
        if ok and ref[1] is not None:
            ok = (r["flex_fp32_grad_rel_diff"] < 1e-3
                  and r["flex_bf16_grad_rel_diff"] <= max(2 * r["dense_bf16_grad_rel_diff"], 5e-2))
        r["ok"] = ok
        report[layout] = r
        print(
            f"check flex vs dense ({layout}, rows {tuple(batch['input_ids'].shape)}, "
            "relative to dense fp32): "
            + ", ".join(
                f"{k.replace('_rel_diff', '')} {v:.1e}"
                for k, v in r.items()
                if isinstance(v, float)
            )
            + f" -> {'ok' if ok else 'FAIL'}"
            + ("" if ref[1] is not None else " (CPU: forward only)"),
            flush=True,
        )
        if not ok:
            failures.append(f"flex vs dense {layout}")
    report["failures"] = failures
    return report


def check_decoding(cfg, dev, samples, mask_id):
    """In fp32 on the preset model: lossless == ar for every prompt, and every mode decodes each
    prompt of a batch (prompts of different lengths, more prompts than rows) exactly as it decodes
    that prompt alone.
    """
    model = build_model(cfg, "sdpa", dev, torch.float32).eval()
    prompts = [p[:8 + 7 * i] for i, (p, _) in enumerate(samples)]
    alone = {
        m: [generate(model, p, m, block_size, mask_id, 32, threshold=threshold) for p in prompts]
        for m in ("ar", "block", "adaptive", "lossless")
    }
    same = sum(a[0] == b[0] for a, b in zip(alone["ar"], alone["lossless"]))
    report, failures = {"lossless_equals_ar": f"{same}/{len(prompts)}"}, []
    if same != len(prompts):
        failures.append("lossless == ar")
    for mode, ref in alone.items():
        batched = generate(model, prompts, mode, block_size, mask_id, 32, threshold=threshold,
                           batch_size=max(1, len(prompts) // 2), compile=compile)
        equal = sum(a == b for a, b in zip(batched, ref))
        report[f"batched_{mode}_equals_alone"] = f"{equal}/{len(prompts)}"
        if equal != len(prompts):
            failures.append(f"batched {mode} == alone")
    print("check decoding (fp32): " + ", ".join(f"{k} {v}" for k, v in report.items())
          + f" -> {'ok' if not failures else 'FAIL'}", flush=True)
    report["failures"] = failures
    return report


def decode_inputs(name, cfg, n_prompt, p_dec):
    """(model loader, prompts, eos ids, mask id, block size, pad id, source) to decode: a trained
    checkpoint on its data (its own mask token and block size), or the random preset model on random
    prompts. Paths and data are read here, before any part runs, so that a typo costs nothing."""
    if not ckpt:
        prompts = [
            p[:n_prompt]
            for p, _ in samples_for(
                decode_samples or p_dec, n_prompt + 1, n_prompt, cfg["vocab_size"]
            )
        ]
        return (lambda dev: build_model(cfg, "sdpa", dev, torch.float32).eval()), prompts, None, \
            cfg["vocab_size"] - 1, block_size, 0, f"random {name}"
    model, tok, path = load_for_decoding(ckpt, torch.device("cpu"))
    if getattr(model.config, "mask_token_id", None) is None:
        raise UserError(f"{path} has no mask token (config.mask_token_id): not trained by train.py")
    conversation = chat.Chat(tok, getattr(model.config, "chat_template_kwargs", None) or {})
    rows = chat.read_rows(data.expand_files(data_files), require_target=False)[
        : decode_samples or 200
    ]
    prompts = [
        conversation.prompt_ids(chat.split_for_decoding(m, first)[0], tools)
        for m, first, tools, _ in rows
    ]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return (
        (lambda dev: model.to(dev)), prompts, conversation.stop_ids(), model.config.mask_token_id,
        getattr(model.config, "next_block_size", block_size), pad, path
    )


# -------------------------------------------------------------------------------------------------
if __name__ == "__main__":
    dev = resolve_device(device)
    name = one_of(
        "preset",
        preset if preset != "auto" else ("qwen3-0.6b" if dev.type == "cuda" else "tiny"),
        tuple(PRESETS),
    )
    at_least("block_size", block_size, 1)
    at_least("steps", steps, 1)
    parts = what.split(",")
    for part in parts:
        one_of("what", part, ("train", "decode", "data", "none"))
    if not all(isinstance(b, int) and b >= 1 for b in decode_batches):
        raise UserError(
            f"decode_batches={decode_batches!r}: expected ints >= 1, e.g. --decode_batches=1,8,32"
        )
    batches = list(decode_batches)
    cfg, p_rows, p_len, p_prompt, p_dec, p_new = PRESETS[name]
    n_rows, length, n_prompt = rows or p_rows, seq_len or p_len, prompt_len or p_prompt
    attn = attention_backend(attention, dev)
    if attn == "flex_attention" and dev.type != "cuda":
        raise UserError(
            "attention='flex' needs CUDA: FlexAttention has no backward on CPU "
            "(use attention='sdpa')"
        )
    mask_id = cfg["vocab_size"] - 1
    machine = (
        torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    print(
        f"bench.py | {machine} | torch {torch.__version__} | "
        f"transformers {transformers.__version__} | preset {name} | attention {attn} | "
        f"block_size {block_size}",
        flush=True,
    )
    out = {
        "machine": machine,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "preset": name,
        "attention": attn,
        "block_size": block_size,
        "gradient_checkpointing": gradient_checkpointing,
        "seconds": {},
    }
    samples = samples_for(n_rows, length, n_prompt, cfg["vocab_size"])
    if "decode" in parts:
        load, prompts, eos, decode_mask_id, decode_B, pad_id, out["decode_model"] = decode_inputs(
            name, cfg, n_prompt, p_dec)
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
        """Run one part. A crash is printed and recorded, and the other parts still run, and the
        JSON is rewritten after every part: a GPU session may get one try, and a partial result
        beats none.
        """
        t = time.perf_counter()
        try:
            out[part] = fn()
        except UserError:
            raise
        except Exception:
            traceback.print_exc()
            out[part] = {"error": traceback.format_exc()}
            failures.append(f"{part} crashed")
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        out["seconds"][part] = time.perf_counter() - t
        print(f"[{part}: {out['seconds'][part]:.0f} s]", flush=True)
        save()

    if check:
        check_samples = samples_for(5, 48, 40, cfg["vocab_size"])
        section("check_flex", lambda: check_flex(cfg, dev, samples, mask_id))
        section("check_decoding", lambda: check_decoding(cfg, dev, check_samples, mask_id))
        for part in ("check_flex", "check_decoding"):
            failures += out[part].get("failures", [])
    if "train" in parts:
        section("train", lambda: bench_train(cfg, dev, attn, samples, mask_id))
    if "data" in parts:
        section("data", lambda: bench_data(tokenizer, data_samples, dev))
    if "decode" in parts:
        n_new = max_new_tokens or p_new
        section(
            "decode",
            lambda: bench_decode(
                load(dev), prompts, decode_mask_id, eos, n_new, dev, decode_B, batches, pad_id
            ),
        )
    if failures:
        print(f"FAILED: {', '.join(failures)}")
        sys.exit(1)
