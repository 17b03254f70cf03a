"""
Decode with a next-block model: every scenario of DESIGN.md section 4, each with a KV cache, and a summary table.

  python sample.py                                  # the demo: newest checkpoint in out/demo, held-out problems
  python sample.py --ckpt=out/x/global_step_1000 --data=test.parquet --scenario=lossless
  python sample.py --scenario=adaptive --threshold=0.9 --verbose=True --num_samples=3
  python sample.py --prompt='What is 123+456?' --scenario=ar,lossless

Scenarios (the seed's numbering in brackets):
  ar        greedy next-token decoding, the baseline [1]
  tf        teacher forcing over prompt + target: next-token accuracy (the overfit test) [1.1]
  block     each forward over [pending][B-1 masks] emits B tokens, all accepted (lossy) [2]
  block_tf  one forward in the training layout: accuracy per offset and tpf_tf [2.1]
  adaptive  like block, keeping offsets while top-1 probability >= threshold and the token repeats no token [3]
  lossless  self-speculative: drafts verified by the clean stream in the same forward; output == ar

In Python:  from sample import generate
            tokens, stats = generate(model, prompt_ids, "lossless", 4, model.config.mask_token_id, 256, eos_id)
"""
import json
import re
import sys
import time

import torch

# ---------------------------------------------------------------------------------------------------------------
# config (python sample.py [config.py] --key=value)
out_dir = "out/demo"                   # where the newest checkpoint is looked up when ckpt is ''
ckpt = ""                              # an HF folder from train.py, its global_step_N, or a run's out_dir; '' = out_dir
data = "data/demo/test.parquet"        # parquet with prompts (targets give tf, block_tf and answer accuracy)
prompt = ""                            # decode this one prompt instead of data
prompt_key = "prompt"                  # prompt column
response_key = "target"                # target column
prompt_format = None                   # for tokenizers without a chat template, e.g. 'Question: {prompt}\nAnswer: '
scenario = "all"                       # one of ar, tf, block, block_tf, adaptive, lossless; a comma list; or 'all'
num_samples = 100                      # the first N rows of data; 0 = all
max_new_tokens = 256                   # per sample
block_size = 0                         # 0 = the trained block size (a different value warns and uses the trained one)
threshold = 0.7                        # adaptive: keep an offset while its top-1 probability is >= this
answer_regex = ""                      # the answer (group 1); '' = after "The answer is", else the last number
verbose = False                        # print every forward's tokens with their top-5 probabilities
color = None                           # colour each forward's tokens: None = on a terminal; True/False force it
summary_json = ""                      # also write the summary numbers to this JSON file
device = "auto"                        # 'auto', 'cpu', 'cuda'
dtype = "float32"                      # 'float32' (lossless == ar exactly) or 'bfloat16'
# ---------------------------------------------------------------------------------------------------------------
from configurator import UserError  # noqa: E402
from mask import dense_mask  # noqa: E402
from model import cache_kwarg, find_hf_folder, load_tokenizer  # noqa: E402

SCENARIOS = ("ar", "tf", "block", "block_tf", "adaptive", "lossless")
MODES = ("ar", "block", "adaptive", "lossless")


# ---------------------------------------------------------------------------------------------------------------
# decoding


@torch.no_grad()
def generate(model, prompt_ids, mode, block_size, mask_token_id, max_new_tokens, eos_token_id=None,
             threshold=0.7, trace=None):
    """Greedy decoding, batch 1, with a KV cache. mode: 'ar', 'block', 'adaptive' or 'lossless'.

    Returns (new token ids, {"forwards", "tokens"}); the prefill counts as a forward. The cache only ever keeps
    verified clean tokens: every forward also appends its masks (and rejected drafts), which are cropped
    right after. With trace=[] every forward appends (tokens it produced, their logits rows) for printing."""
    from transformers import DynamicCache
    if mode not in MODES:
        raise UserError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if len(prompt_ids) == 0:
        raise UserError("empty prompt: there is nothing to decode from")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if mode != "ar" and mask_token_id is None:
        raise UserError(f"mode {mode!r} needs a mask token: this model was not trained by train.py")
    device = next(model.parameters()).device
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
    cache, cache_arg = DynamicCache(config=model.config), cache_kwarg(model)
    out, forwards = [], 0

    def forward(tokens, positions, limits, is_mask, keep=0):
        """Logits [keep or Q, vocab] of the last `keep` (0: all) new query tokens, given every new token's
        metadata; the keys are the cache plus the new tokens. Logits of a long prompt are never needed."""
        nonlocal forwards
        forwards += 1
        c = cache.get_seq_length()
        ids, pos, lim, msk = (torch.tensor(x, device=device) for x in (tokens, positions, limits, is_mask))
        keys = {"doc_ids": torch.zeros(1, c + len(ids), dtype=torch.long, device=device),
                "position_ids": torch.cat([torch.arange(c, device=device), pos])[None],
                "limit": torch.cat([torch.arange(1, c + 1, device=device), lim])[None],
                "is_mask": torch.cat([torch.zeros(c, dtype=torch.bool, device=device), msk])[None]}
        return model(input_ids=ids[None], position_ids=pos[None], attention_mask=dense_mask(keys, len(ids)),
                     use_cache=True, logits_to_keep=keep, **{cache_arg: cache}).logits[0].float()

    def crop_to(length):
        if cache.get_seq_length() > length:
            cache.crop(length - cache.get_seq_length())  # a negative count works on every transformers 5.x

    def accept(new, logits):
        """Append new tokens; True once EOS or max_new_tokens is reached."""
        kept = []
        for t in new:
            out.append(t)
            kept.append(t)
            if t in eos or len(out) >= max_new_tokens:
                break
        if trace is not None:
            trace.append((kept, logits[:len(kept)]))
        return len(out) >= max_new_tokens or (out and out[-1] in eos)

    def clean(start, n):  # metadata of n clean tokens at positions start..start+n-1
        return list(range(start, start + n)), list(range(start + 1, start + n + 1)), [False] * n

    def masks(start, n):  # metadata of a group of n masks drafting the tokens after position start - 1
        return list(range(start, start + n)), [start] * n, [True] * n

    P, D = len(prompt_ids), block_size - 1
    if mode == "ar":
        pos, lim, msk = clean(0, P)
        logits = forward(list(prompt_ids), pos, lim, msk, keep=1)
        done = accept([int(logits[0].argmax())], logits)
        while not done:
            c = cache.get_seq_length()
            logits = forward([out[-1]], [c], [c + 1], [False])
            done = accept([int(logits[0].argmax())], logits)

    elif mode in ("block", "adaptive"):
        pending, done = list(prompt_ids), False
        while not done:
            c, n = cache.get_seq_length(), len(pending)
            cp, cl, cm = clean(c, n)
            mp, ml, mm = masks(c + n, D)
            logits = forward(pending + [mask_token_id] * D, cp + mp, cl + ml, cm + mm, keep=D + 1)  # offsets 0..D
            crop_to(c + n)
            preds, top = logits.argmax(-1).tolist(), logits.softmax(-1).max(-1).values.tolist()
            new = preds
            if mode == "adaptive":
                new = preds[:1]
                for k in range(1, block_size):
                    if top[k] < threshold or preds[k] == new[-1]:
                        break
                    new.append(preds[k])
            done = accept(new, logits)
            pending = new

    else:  # lossless
        # prefill: the prompt and one mask group give the first verified token and the first drafts
        cp, cl, cm = clean(0, P)
        mp, ml, mm = masks(P, D)
        logits = forward(list(prompt_ids) + [mask_token_id] * D, cp + mp, cl + ml, cm + mm, keep=D + 1)
        crop_to(P)
        drafts = logits[1:].argmax(-1).tolist()
        done = accept([int(logits[0].argmax())], logits[:1])
        while not done:
            # [pending][d_1..d_D as clean][G_0]..[G_D]: group G_i drafts after the clean prefix ending at d_i
            c = cache.get_seq_length()
            tokens, (pos, lim, msk) = [out[-1]] + drafts, clean(c, 1 + D)
            for i in range(D + 1):
                gp, gl, gm = masks(c + i + 1, D)
                tokens, pos, lim, msk = tokens + [mask_token_id] * D, pos + gp, lim + gl, msk + gm
            logits = forward(tokens, pos, lim, msk)
            verified = logits[:1 + D].argmax(-1).tolist()  # the AR choice after pending, d_1, .., d_D
            a = 0
            while a < D and drafts[a] == verified[a]:
                a += 1
            group = logits[1 + D + a * D:1 + D + (a + 1) * D]  # G_a drafts what follows the bonus token
            crop_to(c + 1 + a)  # keep pending and the accepted drafts; the bonus token is the next pending
            done = accept(drafts[:a] + [verified[a]], logits[:1 + a])
            drafts = group.argmax(-1).tolist()
    return out, {"forwards": forwards, "tokens": len(out)}


@torch.no_grad()
def teacher_forced(model, prompt_ids, response_ids, block_size, mask_token_id):
    """One forward in the training layout (block offset 0): block_metrics counts (see data.py). With
    block_size 1 it is plain teacher forcing: next-token accuracy over the response."""
    from data import block_metrics, build_example, collate
    device = next(model.parameters()).device
    ex = build_example(prompt_ids, response_ids, block_size, mask_token_id if mask_token_id is not None else 0)
    batch = {k: v.to(device) for k, v in collate([ex], len(ex["input_ids"])).items()
             if isinstance(v, torch.Tensor)}
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                   attention_mask=dense_mask(batch)).logits
    return block_metrics(logits.argmax(-1).cpu(), {k: v.cpu() for k, v in batch.items()}, block_size)


# ---------------------------------------------------------------------------------------------------------------
# loading and reporting

def extract_answer(text, pattern=""):
    """The answer in a text: answer_regex's group 1, else what follows "The answer is", else the last number."""
    if pattern:
        m = re.search(pattern, text)
        return m.group(1).strip() if m else None
    m = re.search(r"The answer is[:\s]*([^\n]*?)\.?\s*$", text.strip(), re.MULTILINE)
    if m:
        return m.group(1).strip()
    numbers = re.findall(r"-?\d[\d,]*\.?\d*", text)
    return numbers[-1].rstrip(".").replace(",", "") if numbers else None


COLORS = ("\033[38;5;39m", "\033[38;5;208m")


def show(tokenizer, trace, use_color, verbose):
    """The generated text, each forward's tokens in alternating colours; with verbose, top-5 per token."""
    pieces = []
    for i, (tokens, logits) in enumerate(trace):
        text = tokenizer.decode(tokens)
        pieces.append(f"{COLORS[i % 2]}{text}\033[0m" if use_color else text)
        if verbose:
            probs = logits.softmax(-1)
            print(f"  forward {i + 1}: {tokenizer.convert_ids_to_tokens(tokens)}")
            for t, p in zip(tokens, probs):
                top = p.topk(5)
                alts = ", ".join(f"{tokenizer.convert_ids_to_tokens(int(j))!r} {v:.2f}"
                                 for v, j in zip(top.values.tolist(), top.indices.tolist()))
                print(f"    {tokenizer.convert_ids_to_tokens(t)!r:>14}  top-5: {alts}")
    return "".join(pieces) if use_color else " | ".join(pieces)


def table(rows):
    """Rows of dicts -> aligned text."""
    cols = list(rows[0])
    cells = [[c for c in cols]] + [[f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols]
                                   for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells)


def main():
    import data as datamod
    from transformers import AutoModelForCausalLM
    global block_size
    wanted = list(SCENARIOS) if scenario == "all" else [s.strip() for s in scenario.split(",")]
    for s in wanted:
        if s not in SCENARIOS:
            raise UserError(f"unknown scenario {s!r} (choose from {', '.join(SCENARIOS)}, or all)")
    dev = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    path = find_hf_folder(ckpt or out_dir)
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=getattr(torch, dtype))
    model = model.to(dev).eval()
    mask_id = getattr(model.config, "mask_token_id", None)
    trained = getattr(model.config, "next_block_size", None)
    if mask_id is None:
        blocky = [s for s in wanted if s not in ("ar", "tf")]
        if scenario != "all" and blocky:
            raise UserError(f"{path} has no mask token (config.mask_token_id): not trained by train.py, so "
                            f"{', '.join(blocky)} cannot run; ar and tf can")
        print(f"note: {path} has no mask token: running ar and tf only")
        wanted = [s for s in wanted if s in ("ar", "tf")]
    if block_size and trained and block_size != trained:
        print(f"warning: block_size={block_size} but the model was trained with {trained}: using {trained}")
    block_size = trained or block_size or 4
    if prompt:
        samples = [([{"role": "user", "content": prompt}], None)]
    else:
        rows = datamod.load_samples(data, prompt_key, response_key)
        samples = [(messages, target) for messages, target, _ in rows[:num_samples or None]]
    end_id, eos = datamod.end_of_turn_id(tokenizer, prompt_format), datamod.stop_ids(tokenizer, prompt_format)
    use_color = sys.stdout.isatty() if color is None else bool(color)
    print(f"checkpoint {path} | block_size {block_size} | mask token {mask_id} | {len(samples)} samples | "
          f"device {dev}")

    summary, texts = {}, {}
    for name in wanted:
        t0, tokens, forwards, correct, graded = time.time(), 0, 0, 0, 0
        counts = None
        for i, (messages, target) in enumerate(samples):
            if target is None and name in ("tf", "block_tf"):
                continue
            if target is None:
                p_ids = datamod.render_prompt(tokenizer, messages, prompt_format)[1]
            else:
                p_ids, r_ids = datamod.encode(tokenizer, messages, target, prompt_format, end_id)
            if name in ("tf", "block_tf"):
                c = teacher_forced(model, p_ids, r_ids, 1 if name == "tf" else block_size, mask_id)
                counts = c if counts is None else counts + c
                tokens, forwards = tokens + len(r_ids), forwards + 1
                continue
            trace = [] if i == 0 else None
            new, stats = generate(model, p_ids, name, block_size, mask_id, max_new_tokens, eos, threshold, trace)
            tokens, forwards = tokens + stats["tokens"], forwards + stats["forwards"]
            text = tokenizer.decode(new, skip_special_tokens=True)
            texts.setdefault(name, []).append(text)
            if target is not None:
                want = extract_answer(target, answer_regex)
                if want is not None:
                    graded += 1
                    correct += extract_answer(text, answer_regex) == want
            if trace is not None:
                print(f"\n[{name}] sample 0, {stats['tokens']} tokens in {stats['forwards']} forwards:")
                print(show(tokenizer, trace, use_color, verbose))
        wall = time.time() - t0
        row = {"scenario": name, "samples": len(samples), "tokens": tokens, "forwards": forwards,
               "tokens/forward": tokens / max(forwards, 1), "wall_s": wall, "tokens/s": tokens / max(wall, 1e-9)}
        if name in ("tf", "block_tf") and counts is not None:
            metrics = datamod.summarize_metrics(counts, 1 if name == "tf" else block_size)
            row["accuracy"] = metrics["acc@0"] if name == "tf" else \
                " ".join(f"{metrics[f'acc@{k}']:.2f}" for k in range(block_size))
            row["tokens/forward"] = metrics["tpf_tf"] if name == "block_tf" else ""  # tf: no decoding
        elif graded:
            row["accuracy"] = correct / graded
        summary[name] = row
    if "ar" in summary:
        for name, row in summary.items():
            if name in MODES:
                row["speedup"] = row["tokens/s"] / max(summary["ar"]["tokens/s"], 1e-9)
        for name in MODES:
            if name != "ar" and name in texts:
                same = sum(a == b for a, b in zip(texts[name], texts["ar"]))
                summary[name]["same_as_ar"] = f"{same}/{len(texts['ar'])}"
    rows = [{k: r.get(k, "") for k in ("scenario", "samples", "tokens", "forwards", "tokens/forward", "wall_s",
                                       "tokens/s", "speedup", "accuracy", "same_as_ar")} for r in summary.values()]
    print("\n" + table(rows))
    if summary_json:
        with open(summary_json, "w") as f:
            json.dump({"checkpoint": path, "block_size": block_size, "scenarios": summary}, f, indent=1)


if __name__ == "__main__":
    from configurator import configure
    configure(globals())
    main()
