"""
Speed, measured side by side in one run: ratios on the same samples and the same model, never absolute claims.

  python bench.py                                  # CPU-sized: a tiny random model, dense-mask (SDPA) path
  python bench.py --preset=qwen3-0.6b              # CUDA: Qwen3-0.6B's shape, random weights (no download)
  python bench.py --check=True --json=b.json       # CUDA: correctness checks first, then the benchmarks
  python bench.py --what=decode --ckpt=out/demo    # decoding speed of a trained checkpoint on its data

train:  one optimizer step (forward, backward, AdamW) on the same samples as (a) plain SFT: clean tokens,
        causal; (b) next-block SFT, split layout; (c) interleaved layout. Time, tokens/s (clean and total),
        peak memory, the ratios b/a and c/a, MFU on known GPUs.
decode: ar, adaptive and lossless (and HF generate) on the same model and prompts: tokens/s, tokens per
        forward, speedup over ar, and the cost of one lossless forward relative to one ar forward.
check:  the BlockMask path equals the dense path (loss and gradients, fp32 and bf16; forward only on CPU)
        and lossless == ar in fp32.
Every part runs even when an earlier one crashed (its traceback is printed and kept in the JSON, which is
rewritten after each part); a failed check or a crash makes the exit code 1.
"""
import json as jsonlib  # 'json' is the config key that names the output file
import statistics
import sys
import time
import traceback

import torch

# ---------------------------------------------------------------------------------------------------------------
preset = "auto"               # 'auto' (tiny on CPU, qwen3-0.6b on CUDA), 'tiny', 'qwen3-0.6b', 'qwen3-8b', 'llama-8b'
what = "train,decode"         # which benchmarks: 'train', 'decode', both, or 'none' (with check: the checks only)
check = False                 # run the correctness checks first (meant for CUDA; works on CPU minus flex training)
rows = 0                      # train: samples per step, one per row; 0 = preset's
seq_len = 0                   # train: clean tokens per sample (prompt + response); 0 = preset's
prompt_len = 0                # tokens of each prompt; 0 = preset's
block_size = 4                # next-block size
steps = 5                     # timed train steps (after 2 warm-up steps), median reported
gradient_checkpointing = False  # recompute activations in backward (memory vs time)
ckpt = ""                     # decode: a checkpoint from train.py or a run's out_dir (else the random preset model)
data = "data/demo/test.parquet"  # decode with ckpt: prompts from this parquet
decode_samples = 0            # decode: prompts; 0 = preset's
max_new_tokens = 0            # decode: tokens per prompt; 0 = preset's
threshold = 0.7               # adaptive decoding threshold
device = "auto"               # 'auto', 'cpu', 'cuda'
attention = "auto"            # train: 'auto' (flex on CUDA, else sdpa), 'flex' (BlockMask), 'sdpa' (dense mask)
json = ""                     # write every number here (--json=bench.json)
seed = 0
# ---------------------------------------------------------------------------------------------------------------

PRESETS = {  # (model config, rows, seq_len, prompt_len, decode samples, new tokens)
    "tiny": (dict(model_type="qwen3", vocab_size=2048, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True),
             2, 508, 60, 4, 64),
    "qwen3-0.6b": (dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                        num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                        tie_word_embeddings=True), 4, 4092, 256, 8, 128),
    "qwen3-8b": (dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                      num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                      tie_word_embeddings=False), 1, 4092, 256, 4, 128),
    "llama-8b": (dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      tie_word_embeddings=False), 1, 4092, 256, 4, 128),
}


def build_model(cfg, attn, dev, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = dict(cfg)
    config = AutoConfig.for_model(cfg.pop("model_type"), max_position_embeddings=16384, **cfg)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype).to(dev)


def samples_for(n, length, prompt, vocab):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, vocab - 1, (prompt,), generator=g).tolist(),
             torch.randint(0, vocab - 1, (length - prompt,), generator=g).tolist()) for _ in range(n)]


def synchronize(dev):
    """Wait for the GPU's queued work, so that a timer reads what it ran (nothing to wait for on CPU)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev, n):
    """Median seconds of fn() over n runs after two warm-ups, and the peak memory (bytes) of one run."""
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


def bench_train(cfg, dev, attn, samples, mask_id):
    """Seconds per optimizer step for the same samples in three layouts."""
    from data import build_example, collate
    from model import flops_per_token, forward_losses, peak_flops
    model = build_model(cfg, attn, dev, torch.float32)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=dev.type == "cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu",
                                                                                                      enabled=False)
    pad = 128 if attn == "flex_attention" else 8
    peak, results = peak_flops(dev), {}
    for name, B, layout in (("plain", 1, "split"), ("split", block_size, "split"),
                            ("interleaved", block_size, "interleaved")):
        examples = [build_example(p, r, B, mask_id, layout, 0) for p, r in samples]
        length = max(len(e["input_ids"]) for e in examples)
        batch = collate(examples, -(-length // pad) * pad, pad_multiple=pad, pad_id=mask_id)
        batch = {k: v.to(dev) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        supervised = (batch["labels"] != -100).sum()

        def step():
            with autocast:
                losses, _, _ = forward_losses(model, batch)  # builds the mask: once per batch, as in train.py
            (losses.sum() / supervised).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        seconds, memory = timed(step, dev, steps)
        real = batch["doc_ids"] >= 0
        total, clean = int(real.sum()), int((real & ~batch["is_mask"]).sum())
        row = {"seconds": seconds, "rows": batch["input_ids"].shape[0], "row_length": batch["input_ids"].shape[1],
               "clean_tokens": clean, "total_tokens": total, "clean_tokens_per_s": clean / seconds,
               "total_tokens_per_s": total / seconds, "peak_memory_gb": memory / 2 ** 30 if memory else None}
        if peak:
            row["mfu"] = flops_per_token(model, batch["input_ids"].shape[1]) * total / seconds / peak
        results[name] = row
        print(f"train {name:12s} {seconds:.4f} s/step | {clean / seconds:9.0f} clean tok/s | "
              f"{total / seconds:9.0f} total tok/s | rows {row['rows']} x {row['row_length']}"
              + (f" | peak {row['peak_memory_gb']:.1f} GiB" if memory else "")
              + (f" | mfu {100 * row['mfu']:.0f}%" if peak else ""), flush=True)
    for name in ("split", "interleaved"):
        results[f"{name}_vs_plain_time"] = results[name]["seconds"] / results["plain"]["seconds"]
        if results["plain"]["peak_memory_gb"]:
            results[f"{name}_vs_plain_memory"] = results[name]["peak_memory_gb"] / results["plain"]["peak_memory_gb"]
    print(f"train ratios: split/plain {results['split_vs_plain_time']:.2f}x time, interleaved/plain "
          f"{results['interleaved_vs_plain_time']:.2f}x time"
          + (f"; memory split/plain {results['split_vs_plain_memory']:.2f}x" if "split_vs_plain_memory" in results
             else ""), flush=True)
    return results


def bench_decode(model, prompts, mask_id, eos, n_new, dev, B):
    """ar, adaptive, lossless and HF generate on the same prompts, blocks of B tokens. The modes take turns on
    each prompt, so that a change in the machine's load (a shared CPU) weighs on every mode alike."""
    from sample import generate
    modes = ("ar", "adaptive", "lossless", "hf_generate")
    results = {m: {"tokens": 0, "forwards": 0, "seconds": 0.0, "outputs": []} for m in modes}
    generate(model, prompts[0], "lossless", B, mask_id, 8, eos)  # warm-up
    for p in prompts:
        for mode in modes:
            row = results[mode]
            synchronize(dev)
            t = time.perf_counter()
            if mode == "hf_generate":
                out = model.generate(torch.tensor([p], device=dev), do_sample=False, max_new_tokens=n_new,
                                     eos_token_id=list(eos) if eos else None, pad_token_id=0)
                new = out[0, len(p):].tolist()
                stats = {"tokens": len(new), "forwards": len(new)}
            else:
                new, stats = generate(model, p, mode, B, mask_id, n_new, eos, threshold)
            synchronize(dev)
            row["seconds"] += time.perf_counter() - t
            row["tokens"] += stats["tokens"]
            row["forwards"] += stats["forwards"]
            row["outputs"].append(new)
    for row in results.values():
        row["tokens_per_s"] = row["tokens"] / row["seconds"]
        row["tokens_per_forward"] = row["tokens"] / row["forwards"]
    ar, ar_outputs = results["ar"], results["ar"]["outputs"]
    for mode, row in results.items():
        row["speedup_vs_ar"] = row["tokens_per_s"] / ar["tokens_per_s"]
        row["seconds_per_forward"] = row["seconds"] / row["forwards"]
        row["forward_cost_vs_ar"] = row["seconds_per_forward"] / (ar["seconds"] / ar["forwards"])
        row["same_as_ar"] = sum(a == b for a, b in zip(row.pop("outputs"), ar_outputs))
        print(f"decode {mode:11s} {row['tokens_per_s']:8.1f} tok/s | {row['tokens_per_forward']:.2f} tok/forward | "
              f"speedup {row['speedup_vs_ar']:.2f}x | forward cost {row['forward_cost_vs_ar']:.2f}x ar | "
              f"same as ar {row['same_as_ar']}/{len(ar_outputs)}", flush=True)
    ll = results["lossless"]
    ll["speedup_over_tpf"] = ll["speedup_vs_ar"] / ll["tokens_per_forward"]
    print(f"decode lossless: speedup / tokens-per-forward = {ll['speedup_over_tpf']:.2f} (target >= 0.8)")
    return results


def _loss_and_grads(cfg, attn, dev, batch, bf16):
    """Per-token losses and (with autograd on CUDA) all gradients, flattened, of one forward+backward."""
    from model import forward_losses
    model = build_model(cfg, attn, dev, torch.float32)
    backward = dev.type == "cuda"  # FlexAttention has no backward on CPU: the dry run checks the forward only
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16), torch.set_grad_enabled(backward):
        loss, _, _ = forward_losses(model, batch)
    if not backward:
        return loss.float(), None
    loss.mean().backward()
    return loss.detach().float(), torch.cat([p.grad.flatten().float() for p in model.parameters()
                                             if p.grad is not None])


def check_flex(cfg, dev, samples, mask_id):
    """The FlexAttention BlockMask path against the dense SDPA path, both layouts, on the preset's attention
    shape (its first 4 layers, 2 samples). The reference is dense in fp32. Flex in fp32 must match it to 1e-3
    (a mask bug shows here: one wrongly visible key per mask gives 2e-2 on the tiny preset); flex under bf16
    autocast, as training runs, must be no further from it than dense under bf16 autocast is (2x, or 1e-2 /
    5e-2, whichever is larger). On CPU: forward only."""
    from data import build_example, collate
    cfg = dict(cfg, num_hidden_layers=min(4, cfg["num_hidden_layers"]))
    report, failures = {}, []

    def rel(a, b):  # relative to b's spread: random-weight losses are all about log(vocab) and differ little
        return None if a is None else ((a - b).norm() / (b - b.mean()).norm()).item()

    for layout in ("split", "interleaved"):
        examples = [build_example(p, r, block_size, mask_id, layout, s % block_size)
                    for s, (p, r) in enumerate(samples[:2])]
        L = -(-max(len(e["input_ids"]) for e in examples) // 128) * 128
        batch = {k: v.to(dev) for k, v in collate(examples, L, 128, mask_id).items() if isinstance(v, torch.Tensor)}
        ref = _loss_and_grads(cfg, "sdpa", dev, batch, bf16=False)
        runs, r = {}, {}
        for run, attn, bf16 in (("flex_fp32", "flex_attention", False), ("flex_bf16", "flex_attention", True),
                                ("dense_bf16", "sdpa", True)):
            try:
                runs[run] = _loss_and_grads(cfg, attn, dev, batch, bf16)
            except Exception as e:  # e.g. a kernel that does not fit this GPU: this run fails, the others still go
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
        print(f"check flex vs dense ({layout}, rows {tuple(batch['input_ids'].shape)}, relative to dense fp32): "
              + ", ".join(f"{k.replace('_rel_diff', '')} {v:.1e}" for k, v in r.items() if isinstance(v, float))
              + f" -> {'ok' if ok else 'FAIL'}" + ("" if ref[1] is not None else " (CPU: forward only)"), flush=True)
        if not ok:
            failures.append(f"flex vs dense {layout}")
    report["failures"] = failures
    return report


def check_lossless(cfg, dev, samples, mask_id):
    """lossless decoding gives exactly the ar output, in fp32, on the preset model."""
    from sample import generate
    model = build_model(cfg, "sdpa", dev, torch.float32).eval()
    same = 0
    for p, _ in samples:
        ar, _ = generate(model, p[:64], "ar", block_size, mask_id, 32)
        ll, _ = generate(model, p[:64], "lossless", block_size, mask_id, 32)
        same += ar == ll
    ok = same == len(samples)
    print(f"check lossless == ar (fp32): {same}/{len(samples)} -> {'ok' if ok else 'FAIL'}", flush=True)
    return {"lossless_equals_ar": f"{same}/{len(samples)}", "failures": [] if ok else ["lossless == ar"]}


def decode_inputs(name, cfg, n_prompt, p_dec):
    """(model loader, prompts, eos ids, mask id, block size, source) to decode: a trained checkpoint on its data
    (its own mask token and block size), or the random preset model on random prompts. Paths and data are read
    here, before any part runs, so that a typo costs nothing."""
    if not ckpt:
        prompts = [p[:n_prompt] for p, _ in samples_for(decode_samples or p_dec, n_prompt + 1, n_prompt,
                                                           cfg["vocab_size"])]
        return (lambda dev: build_model(cfg, "sdpa", dev, torch.float32).eval()), prompts, None, \
            cfg["vocab_size"] - 1, block_size, f"random {name}"
    import data as datamod
    from transformers import AutoConfig, AutoModelForCausalLM

    from configurator import UserError
    from model import find_hf_folder, load_tokenizer
    path = find_hf_folder(ckpt)
    config = AutoConfig.from_pretrained(path)
    if getattr(config, "mask_token_id", None) is None:
        raise UserError(f"{path} has no mask token (config.mask_token_id): not trained by train.py")
    tok = load_tokenizer(path)
    prompts = [datamod.render_prompt(tok, m)[1] for m, _, _ in datamod.load_samples(data)[:decode_samples or 50]]

    def load(dev):  # fp32 whatever dtype the checkpoint was exported in, as sample.py: lossless == ar exactly
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32)
        return model.to(dev).eval()

    return load, prompts, datamod.stop_ids(tok), config.mask_token_id, getattr(config, "next_block_size", block_size), \
        path


def main():
    import gc

    import transformers

    from configurator import UserError
    from model import attention_backend
    dev = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    name = preset if preset != "auto" else ("qwen3-0.6b" if dev.type == "cuda" else "tiny")
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r} (choose from auto, {', '.join(PRESETS)})")
    if block_size < 1:
        raise UserError(f"block_size must be >= 1, got {block_size}")
    parts = what.split(",")
    if not set(parts) <= {"train", "decode", "none"}:
        raise UserError(f"what={what!r}: expected train, decode, train,decode or none")
    cfg, p_rows, p_len, p_prompt, p_dec, p_new = PRESETS[name]
    n_rows, length, n_prompt = rows or p_rows, seq_len or p_len, prompt_len or p_prompt
    attn = attention_backend(attention, dev)
    if attn == "flex_attention" and dev.type != "cuda":
        raise UserError("attention='flex' needs CUDA: FlexAttention has no backward on CPU (use attention='sdpa')")
    mask_id = cfg["vocab_size"] - 1
    machine = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"bench.py | {machine} | torch {torch.__version__} | transformers {transformers.__version__} | "
          f"preset {name} | attention {attn} | block_size {block_size}", flush=True)
    out = {"machine": machine, "torch": torch.__version__, "transformers": transformers.__version__, "preset": name,
           "attention": attn, "block_size": block_size, "gradient_checkpointing": gradient_checkpointing,
           "seconds": {}}
    samples = samples_for(n_rows, length, n_prompt, cfg["vocab_size"])
    if "decode" in parts:
        load_model, prompts, eos, decode_mask_id, decode_B, out["decode_model"] = decode_inputs(name, cfg, n_prompt,
                                                                                               p_dec)
    failures = []

    def save():
        if json:
            with open(json, "w") as f:
                jsonlib.dump(out, f, indent=1)

    try:
        save()  # now, so that a bad path fails before any part runs
    except OSError as e:
        raise UserError(f"json={json!r}: {e.strerror}") from None

    def section(part, fn):
        """Run one part. A crash is printed and recorded, and the other parts still run, and the JSON is
        rewritten after every part: a GPU session may get one try, and a partial result beats none."""
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
        for part, fn in (("check_flex", check_flex), ("check_lossless", check_lossless)):
            section(part, lambda: fn(cfg, dev, samples, mask_id))
            failures += out[part].get("failures", [])
    if "train" in parts:
        section("train", lambda: bench_train(cfg, dev, attn, samples, mask_id))
    if "decode" in parts:
        n_new = max_new_tokens or p_new
        print(f"decode: {len(prompts)} prompts, {n_new} new tokens max, block size {decode_B}, model "
              f"{out['decode_model']}", flush=True)
        section("decode", lambda: bench_decode(load_model(dev), prompts, decode_mask_id, eos, n_new, dev, decode_B))
    if failures:
        print(f"FAILED: {', '.join(failures)}")
        sys.exit(1)


if __name__ == "__main__":
    from configurator import configure
    configure(globals())
    main()
