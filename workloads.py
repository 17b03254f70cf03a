"""
The workloads bench.py measures beyond a model's forward: serve.py under concurrent streaming
clients over loopback (bench_serve: lossless against ar on one server, the request's `mode`, side
by side in turns, at several client counts), and the data path on a synthetic reasoning corpus
(bench_data: the store, a warm start, Batches, train.py's start-up).

    report = bench_serve("out/demo", [[{"role": "user", "content": "What is 1+2?"}]] * 64,
                         clients=(1, 8, 32), rounds=2, n_new=96)

Serving, per mode and client count: completed tokens/s, tokens per forward, time to the first
token, the time per token after it (a chunk's gap over the tokens it brought, counted per token)
and the gap between chunks (p50, p99).
"""

import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from transformers import AutoConfig, AutoModelForCausalLM

import chat
import data
from demo import demo_tokenizer
from store import load_store

HERE = os.path.dirname(os.path.abspath(__file__))  # serve.py and train.py run from here


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else None


def stream_one(url, body):
    """One streamed chat completion: (seconds to its first token, [(seconds, tokens) per chunk
    after it], its usage)."""
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    t0, last, first, gaps, usage = time.perf_counter(), None, None, [], None
    with urllib.request.urlopen(request, timeout=600) as r:
        for line in r:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            n = sum(len(c.get("token_ids") or []) for c in chunk.get("choices", []))
            now = time.perf_counter()
            if n and first is None:
                first = now - t0
            elif n:
                gaps.append((now - last, n))
            last = now if n else last
    return first, gaps, usage


def run_clients(url, asked, c, n, mode, n_new):
    """c clients at once, streaming n greedy answers in all (client i: prompts i, i + c, ...):
    (seconds, [stream_one's result per answer])."""
    results, t0 = [None] * n, time.perf_counter()

    def client(i):
        for j in range(i, n, c):
            results[j] = stream_one(url, {
                "messages": asked[j % len(asked)], "max_tokens": n_new, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True},
                "return_token_ids": True, "mode": mode})

    threads = [threading.Thread(target=client, args=(i,)) for i in range(c)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, results


def serve_row(runs):
    """The numbers of one mode at one client count, over its runs."""
    seconds = sum(s for s, _ in runs)
    answers = [a for _, results in runs for a in results]
    tokens = sum(u["completion_tokens"] for _, _, u in answers)
    forwards = sum(u["forwards"] for _, _, u in answers)
    gaps = [g for _, gs, _ in answers for g in gs]
    # per token (vLLM's TPOT): an answer's time after its first chunk over the tokens that followed
    tpot = [sum(g for g, _ in gs) / sum(n for _, n in gs) for _, gs, _ in answers if gs]
    ttft = [f for f, _, _ in answers if f is not None]
    return {"seconds": seconds, "answers": len(answers), "tokens": tokens, "forwards": forwards,
            "tokens_per_s": tokens / seconds, "tokens_per_forward": tokens / max(forwards, 1),
            "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
            "per_token_p50": percentile(tpot, 50), "per_token_p99": percentile(tpot, 99),
            "chunk_gap_p50": percentile([g for g, _ in gaps], 50),
            "chunk_gap_p99": percentile([g for g, _ in gaps], 99)}


def bench_serve(path, asked, clients, rounds, n_new, device="auto"):
    """serve.py on the checkpoint at path, lossless and ar in turns (one server: the request's
    `mode`), with c concurrent clients for each c of clients, each streaming its share of the
    conversations `asked` (prompt messages) greedily, n_new tokens at most."""
    proc = subprocess.Popen([sys.executable, "serve.py", f"--ckpt={path}", "--port=0",
                             f"--max_batch={max(clients)}", f"--device={device}"], cwd=HERE,
                            stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        line = proc.stdout.readline()
        while line and not line.startswith("serving "):
            line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"serve.py ended with {proc.wait()}")
        url = line.split(" on ")[-1].strip() + "/v1/chat/completions"
        out = {}
        for c in clients:
            for mode in ("ar", "lossless"):  # warm-up: lossless calibrates this batch size
                run_clients(url, asked, c, c, mode, min(n_new, 16))
            measured = {"ar": [], "lossless": []}
            for _ in range(rounds):
                for mode in measured:
                    measured[mode].append(run_clients(url, asked, c, max(2 * c, 8), mode, n_new))
            modes = out[f"clients_{c}"] = {m: serve_row(runs) for m, runs in measured.items()}
            modes["lossless_vs_ar"] = modes["lossless"]["tokens_per_s"] / modes["ar"]["tokens_per_s"]
            ll, ar = modes["lossless"], modes["ar"]
            print(f"serve {c:>3} clients: lossless {ll['tokens_per_s']:7.1f} tok/s "
                  f"({ll['tokens_per_forward']:.2f} tok/fwd), ar {ar['tokens_per_s']:7.1f}: "
                  f"{modes['lossless_vs_ar']:.2f}x | ttft p50 {1e3 * ll['ttft_p50']:.0f} / "
                  f"{1e3 * ar['ttft_p50']:.0f} ms | per token (TPOT) p50 {1e3 * ll['per_token_p50']:.1f}"
                  f" / {1e3 * ar['per_token_p50']:.1f} ms, p99 {1e3 * ll['per_token_p99']:.1f} / "
                  f"{1e3 * ar['per_token_p99']:.1f} ms | between chunks p99 "
                  f"{1e3 * ll['chunk_gap_p99']:.1f} / {1e3 * ar['chunk_gap_p99']:.1f} ms",
                  flush=True)
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        proc.stdout.close()


# -------------------------------------------------------------------------------------------------
# data

def rss_mb():
    """This process's resident memory (MB), from /proc (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def corpus(path, n, seed_):
    """A synthetic reasoning corpus as parquet: n samples, targets of ~1,100 words in a <think>
    block (~1.4k tokens with a BPE)."""
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = random.Random(seed_)
    words = ("the of and to in is that for it as with was on be by this are from at or an have not "
             "which but they we all can more so if then add carry column sum digit").split()
    rows = [{"prompt": f"Question {i}: what is {rng.randint(1, 999)} + {rng.randint(1, 999)}?",
             "target": "<think>\n" + " ".join(rng.choice(words) for _ in range(1100))
             + f"\n</think>\n\nThe answer is {rng.randint(2, 1998)}."} for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows), path)


def bench_data(tok_path, n, B, seed_, base):
    """The data path on corpus(n): building the store (tokens/s), a warm start (the time and memory
    of finding and opening the store, counting what to drop, planning the batches, the first
    micro-batches), Batches.next per step, token-budget packing; with a tokenizer, train.py's start
    before its first step (train_start, a model shrunk from base)."""
    work = tempfile.mkdtemp(prefix="bench-data-")
    tok = chat.load_tokenizer(tok_path) if tok_path else demo_tokenizer()
    chat.add_mask_token(tok)
    path = os.path.join(work, "train.parquet")
    corpus(path, n, seed_)
    conversation = chat.Chat(tok)
    store, _, built = load_store(path, conversation, os.path.join(work, "cache"))
    out = {"samples": len(store), "tokens": store.info["tokens"], "build_seconds": built,
           "build_tokens_per_s": store.info["tokens"] / built}
    del store
    gc.collect()
    before, t = rss_mb(), time.perf_counter()
    store, _, found = load_store(path, conversation, os.path.join(work, "cache"))
    keep, _, _ = data.too_long(store, 4096, B)
    batches = data.Batches(store.select(keep), 8, 1, 4096, B, 0, seed=seed_)
    batches.next()
    out.update(warm_seconds=time.perf_counter() - t, warm_rss_growth_mb=rss_mb() - before,
               warm_found=found is None)
    t = time.perf_counter()
    for _ in range(20):
        micro = batches.next()
    out.update(next_ms=(time.perf_counter() - t) / 20 * 1e3,
               next_tokens=int((micro[0]["doc_ids"] >= 0).sum()))
    budget = data.Batches(store.select(keep), 0, 1, 4096, B, 0, seed=seed_, batch_tokens=16384)
    lengths = data.example_lengths(budget.samples, B, budget._epoch_plan(0)[1])
    real = [sum(min(lengths[i], 4096) for row in mb for i in row) for mb in budget._plan(0)]
    out.update(batch_tokens_padding=budget.padding(),
               batch_tokens_max_over_min=max(real) / min(real))
    print(f"data: {out['samples']} samples, {out['tokens']:,} tokens | store built at "
          f"{out['build_tokens_per_s'] / 1e3:.0f}k tokens/s | warm start {out['warm_seconds']:.2f} "
          f"s, RSS +{out['warm_rss_growth_mb']:.0f} MB | Batches.next {out['next_ms']:.1f} ms for "
          f"{out['next_tokens']} tokens | batch_tokens: padding "
          f"{100 * out['batch_tokens_padding']:.1f}%, max/min tokens "
          f"{out['batch_tokens_max_over_min']:.2f}", flush=True)
    if tok_path:
        out.update(train_start(work, path, tok_path, len(tok), base))
    shutil.rmtree(work, ignore_errors=True)
    return out


def train_start(work, path, tok_path, vocab, base):
    """train.py itself on the corpus, with a tiny model of the tokenizer's vocabulary (base: a
    model config to shrink): the seconds to its first step and its peak memory, cold (building the
    store) and warm."""
    tiny = dict(base, vocab_size=vocab, hidden_size=32, intermediate_size=64,
                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    config = AutoConfig.for_model(tiny.pop("model_type"), **tiny)
    AutoModelForCausalLM.from_config(config).save_pretrained(os.path.join(work, "model"))
    chat.load_tokenizer(tok_path).save_pretrained(os.path.join(work, "model"))
    probe = ("import resource, subprocess, sys, time; t = time.time(); "
             "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "print(time.time() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
             "p.returncode); print(p.stdout); print(p.stderr)")
    out = {}
    for start in ("cold", "warm"):
        args = [sys.executable, os.path.join(HERE, "train.py"), "--device=cpu",
                f"--init_from={work}/model", f"--train_files={path}", "--val_files=None",
                "--demo_data=False", "--max_steps=1", "--batch_size=1", "--max_length=2048",
                f"--out_dir={work}/out_{start}", f"--data_cache={work}/train_cache"]
        p = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True)
        seconds, peak, rc = p.stdout.split("\n")[0].split()
        out[f"train_{start}_seconds"] = float(seconds)
        out[f"train_{start}_peak_rss_mb"] = int(peak) / 1024
        print(f"data: train.py start, {start}: {float(seconds):.1f} s in all (one step included), "
              f"peak RSS {int(peak) / 1024:.0f} MB, exit {rc}", flush=True)
    return out
