"""
Decode with a next-block model: every scenario (docs/design.md, "Decoding"), batched over many
prompts, each row with its own KV-cache length, and a summary table.

  python sample.py                     # the demo: newest checkpoint in out/demo, held-out problems
  python sample.py --ckpt=out/x/global_step_1000 --data_files=test.parquet --scenario=lossless \
      --batch_size=64
  python sample.py --scenario=adaptive --threshold=0.9 --verbose=True --num_samples=3
  python sample.py --prompt='What is 123+456?' --scenario=ar,lossless
  torchrun --standalone --nproc_per_node=8 sample.py --ckpt=out/x --data_files=test.parquet

Scenarios (the seed's numbering in brackets):
  ar        greedy next-token decoding, the baseline [1]
  tf        teacher forcing over prompt + target: next-token accuracy (the overfit test) [1.1]
  block     each forward over [pending][B-1 masks] emits B tokens, all accepted (lossy) [2]
  block_tf  one forward in the training layout: accuracy per offset and tpf_tf [2.1]
  adaptive  like block, keeping offsets while top-1 probability >= threshold and the token
            repeats no token [3]
  lossless  self-speculative: drafts verified by the clean stream in the same forward; output == ar
Under torchrun each rank decodes its share of the samples and rank 0 prints one summary.

In Python:
    from sample import generate
    results = generate(model, [ids_a, ids_b], "lossless", 4, model.config.mask_token_id, 256, eos)
    for tokens, stats in results: ...  # stats: {"tokens", "forwards"}
"""

import json
import os
import re
import sys
import time
from collections import deque

import torch
import torch.distributed as dist
from transformers import AutoConfig
from transformers.cache_utils import Cache, CacheLayerMixin

import chat
import data
from checkpoint import find_hf_folder, load_for_decoding
from common import compute_cleanup, compute_init, print0
from configurator import UserError, at_least, between, configure, one_of
from mask import dense_mask
from model import cache_kwarg, load_tokenizer, set_gate

# -------------------------------------------------------------------------------------------------
# config (python sample.py [config.py] --key=value)
out_dir = "out/demo"             # where the newest checkpoint is looked up when ckpt is ''
ckpt = ""                        # an HF folder from train.py, its global_step_N, or a run's out_dir
data_files = "data/demo/test.parquet"  # prompts (and targets: they give tf, block_tf, accuracy)
prompt = ""                      # decode this one prompt instead of data_files
prompt_key = "prompt"            # prompt column
response_key = "target"          # target column (optional: it gives tf, block_tf and accuracy)
messages_key = "messages"        # whole-conversation column: its last assistant turn is decoded
tools_key = "tools"              # tool schemas column, handed to the chat template when present
chat_template_kwargs = None      # template options; None = those the checkpoint was trained with
prompt_format = None             # 'Question: {prompt}\nAnswer: ' for tokenizers without a template
scenario = "all"                 # ar, tf, block, block_tf, adaptive, lossless; a comma list; 'all'
num_samples = 100                # the first N rows of data_files; 0 = all
max_new_tokens = 256             # per sample
batch_size = 16                  # prompts decoded at once (KV cache rows); finished rows refill
block_size = 0                   # 0 = the trained one (another value warns, uses the trained)
threshold = 0.7                  # adaptive: keep an offset while its top-1 probability is >= this
compile = False                  # torch.compile the decoding step (CUDA graphs on a GPU)
answer_regex = ""                # the answer (group 1); '' = \boxed{..}, "The answer is ..",
#                                  "#### ..", the last number
verbose = False                  # print every forward's tokens with their top-5 probabilities
color = None                     # colour each forward's tokens: None = on a terminal; True/False
summary_json = ""                # also write the summary numbers to this JSON file
device = "auto"                  # 'auto', 'cpu', 'cuda'
dtype = "float32"                # 'float32' (lossless == ar exactly) or 'bfloat16'
# -------------------------------------------------------------------------------------------------
if __name__ == "__main__":
    config = configure(globals())

SCENARIOS = ("ar", "tf", "block", "block_tf", "adaptive", "lossless")
MODES = ("ar", "block", "adaptive", "lossless")


# -------------------------------------------------------------------------------------------------
# the KV cache: one row per sequence, each with its own length

class RowLayer(CacheLayerMixin):
    """One layer of a RowCache: keys and values [rows, kv_heads, capacity, head_dim], allocated
    once."""
    is_compileable, is_sliding = True, False

    def __init__(self, cache):
        super().__init__()
        self.cache = cache

    def lazy_initialization(self, key_states, value_states):
        shape = (self.cache.rows, key_states.shape[1], self.cache.capacity)
        self.keys = key_states.new_zeros(*shape, key_states.shape[-1])
        self.values = value_states.new_zeros(*shape, value_states.shape[-1])
        if not torch.compiler.is_compiling():  # fixed addresses allow a CUDA graph
            torch._dynamo.mark_static_address(self.keys)
            torch._dynamo.mark_static_address(self.values)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        """Write each row's new tokens at that row's own slots; return the keys and values they
        attend over."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        rows, slots = self.cache.step_rows[:, None], self.cache.write_at
        self.keys[rows, :, slots] = key_states.transpose(1, 2)
        self.values[rows, :, slots] = value_states.transpose(1, 2)
        keys, values = self.keys[:, :, :self.cache.kv_len], self.values[:, :, :self.cache.kv_len]
        if self.cache.all_rows:
            return keys, values
        return keys[self.cache.step_rows], values[self.cache.step_rows]

    def get_mask_sizes(self, query_length):
        return self.cache.capacity, 0

    def get_seq_length(self):
        return 0  # rows differ: the lengths live in the decoder's row states

    def get_max_length(self):
        return self.cache.capacity


class RowCache(Cache):
    """A KV cache written by position, one row per sequence (gpt-fast's idea, per row). Row r holds
    its verified tokens at slots 0..length-1 (slot = position). A forward writes each taking-part
    row's new tokens at the slots `write_at` (right after that row's verified ones; padding goes to
    a slot after those, unseen); a step keeps what it accepted by moving the row's length, and what
    it did not accept is overwritten by the row's next step: no cropping, no re-padding, no moving
    rows. Attention comes from mask.py's rule with each row's own metadata, so rows that accepted
    different numbers of tokens stay exact."""

    def __init__(self, num_layers, rows, capacity, device):
        self.rows, self.capacity = rows, capacity
        self.slots = torch.arange(capacity, device=device)
        super().__init__(layers=[RowLayer(self) for _ in range(num_layers)])
        self.step_rows = None  # the cache rows taking part in this forward
        self.write_at = None  # [rows, queries]: the slot each new token is written to
        self.all_rows = True  # every row takes part (no gather, no scatter)
        self.kv_len = capacity  # slots attention reads this forward


# -------------------------------------------------------------------------------------------------
# decoding: prefill, one step per mode, accept

class Row:
    """One prompt being decoded in a cache row: verified tokens in the cache (length), verified
    tokens not yet in it (pending), the drafts of the last lossless step, the output so far and the
    forwards it took part in.
    """

    def __init__(self, index, prompt, slot):
        self.index, self.prompt, self.slot = index, list(prompt), slot
        self.length = 0
        self.pending = list(prompt)
        self.drafts = []
        self.out = []
        self.forwards = 0
        self.done = False


def clean(tokens, start):
    """(token, position, limit, is_mask) of clean tokens at positions start, start + 1, ..."""
    return [(t, start + i, start + i + 1, False) for i, t in enumerate(tokens)]


def masks(mask_id, start, n):
    """A group of n masks drafting the tokens after position start - 1: each sees the clean tokens
    before start."""
    return [(mask_id, start + j, start, True) for j in range(n)]


def step_items(row, mode, mask_id, D):
    """The new tokens one forward feeds for row: its first forward (prefill) or a decoding step."""
    c = row.length
    if mode == "ar":
        return clean(row.pending, c)
    if mode in ("block", "adaptive") or not row.out:  # [pending][D masks]; lossless prefill too
        return clean(row.pending, c) + masks(mask_id, c + len(row.pending), D)
    # lossless: [pending][d_1..d_D as clean][G_0]..[G_D]: group G_i drafts after the clean prefix
    # ending at d_i
    items = clean(row.pending + row.drafts, c)
    for i in range(D + 1):
        items += masks(mask_id, c + i + 1, D)
    return items


def run_forward(model, cache, rows, items, width, keep, step_fn, fixed=False):
    """One forward over the given rows: each row's items left-padded to width. Returns float logits
    of the last `keep` queries of every row (0: all) [len(rows), keep or width, vocab]. Keys are
    each row's cache slots up to the longest row's new tokens (all of them when fixed, so that every
    step has the same shape); mask.py's rule decides what each query sees. A pad query writes to the
    slot after its row's new tokens, unseen.
    """
    device, n = cache.slots.device, len(rows)
    table = torch.tensor(
        [[(0, 0, 0, 0)] * (width - len(x)) + x for x in items], device=device
    ).view(n, width, 4)
    tok, pos, lim, msk = table.unbind(-1)
    msk = msk.bool()
    counts = torch.tensor([len(x) for x in items], device=device)[:, None]
    real = torch.arange(width, device=device) >= width - counts  # left padding
    longest = max(r.length for r in rows)
    kv_len = cache.capacity if fixed else min(cache.capacity, -(-(longest + width + 1) // 64) * 64)
    length = torch.tensor([r.length for r in rows], device=device)[:, None]
    write_at = torch.where(
        real, length + torch.arange(width, device=device) - (width - counts), length + width
    )
    slots = cache.slots[:kv_len]
    q_doc = torch.where(real, 0, -1)
    keys = {
        "doc_ids": torch.where(slots < length, 0, -1).scatter_(1, write_at, q_doc),
        "position_ids": slots.expand(n, kv_len).scatter(1, write_at, pos),
        "limit": (slots + 1).expand(n, kv_len).scatter(1, write_at, lim),
        "is_mask": torch.zeros(n, kv_len, dtype=torch.bool, device=device).scatter_(
            1, write_at, msk
        ),
    }
    mask = dense_mask(keys, queries=(q_doc, pos, torch.where(real, lim, 0), msk, write_at))
    cache.step_rows = torch.tensor([r.slot for r in rows], device=device)
    cache.all_rows = n == cache.rows and all(r.slot == i for i, r in enumerate(rows))
    cache.write_at, cache.kv_len = write_at, kv_len
    set_gate(model, msk)  # a gated adapter (lora.py) acts on the masks only: ar runs the base
    for r in rows:
        r.forwards += 1
    return step_fn(model, cache, tok, pos, mask, keep)


def model_forward(model, cache, tokens, positions, mask, keep):
    out = model(
        input_ids=tokens, position_ids=positions, attention_mask=mask, use_cache=True,
        logits_to_keep=keep, **{cache_kwarg(model): cache}
    )
    return out.logits.float()


def cache_device(model):
    return next(model.parameters()).device


def accept(row, new, logits, eos, max_new_tokens, trace):
    """Append new tokens to row's output until EOS or max_new_tokens; the rest is dropped."""
    kept = []
    for t in new:
        row.out.append(t)
        kept.append(t)
        if t in eos or len(row.out) >= max_new_tokens:
            row.done = True
            break
    if trace is not None and row.index == 0:
        trace.append((kept, logits[:len(kept)]))
    return kept


def finish_forward(rows, logits, mode, threshold, B, eos, max_new_tokens, trace):
    """What each row accepts from its forward's logits, and what its cache keeps (docs/design.md,
    "Decoding")."""
    D = B - 1
    for row, lg in zip(rows, logits):
        if mode == "lossless" and row.out:
            verified = lg[:B].argmax(-1).tolist()  # the AR choice after pending, d_1, .., d_D
            a = 0
            while a < D and row.drafts[a] == verified[a]:
                a += 1
            group = lg[B + a * D:B + (a + 1) * D]  # G_a drafts what follows the bonus token
            row.length += 1 + a  # pending and the accepted drafts are cached; the bonus is pending
            accept(row, row.drafts[:a] + [verified[a]], lg[:1 + a], eos, max_new_tokens, trace)
            row.pending, row.drafts = [verified[a]], group.argmax(-1).tolist()
            continue
        row.length += len(row.pending)  # what this forward fed as clean tokens is now cached
        if mode == "ar":
            new = [int(lg[-1].argmax())]
        elif mode == "lossless":  # prefill: the first verified token, and the first drafts
            new, row.drafts = [int(lg[0].argmax())], lg[1:].argmax(-1).tolist()
        else:
            new = lg.argmax(-1).tolist()
            if mode == "adaptive":
                top = lg.softmax(-1).max(-1).values.tolist()
                new = new[:1] + [t for t in _confident_run(new, top, threshold)]
        kept = accept(row, new, lg, eos, max_new_tokens, trace)
        row.pending = kept if mode != "lossless" else new


def _confident_run(preds, top, threshold):
    """Offsets 1.. of an adaptive step, kept while each is confident and differs from the token
    before it."""
    for k in range(1, len(preds)):
        if top[k] < threshold or preds[k] == preds[k - 1]:
            break
        yield preds[k]


@torch.inference_mode()
def generate(
    model, prompts, mode, block_size, mask_token_id, max_new_tokens, eos_token_id=None,
    threshold=0.7, batch_size=16, trace=None, compile=False
):
    """Greedy decoding of many prompts at once with a per-row KV cache. mode: 'ar', 'block',
    'adaptive' or 'lossless'. prompts: a list of token-id lists (or one list of ints: one result,
    not a list).

    Returns, per prompt, (new token ids, {"forwards", "tokens"}): forwards are the forwards the
    prompt took part in, its prefill included. batch_size rows decode together; when a row finishes
    (EOS or max_new_tokens) the next waiting prompt takes its slot. Each row's output is what that
    prompt gives decoded alone. With trace=[] the first prompt's forwards append (tokens they
    produced, their logits rows) for printing. compile=True compiles the decoding step; every step
    then has the same shape (rows x queries x capacity).
    """
    single = isinstance(prompts, (list, tuple)) and len(prompts) > 0 and isinstance(prompts[0], int)
    prompts = [list(prompts)] if single else [list(p) for p in prompts]
    one_of("mode", mode, MODES)
    if not prompts:
        raise UserError("no prompts: there is nothing to decode")
    for i, p in enumerate(prompts):
        if not p:
            raise UserError(f"prompt {i} is empty: there is nothing to decode from")
    at_least("max_new_tokens", max_new_tokens, 1)
    at_least("batch_size", batch_size, 1)
    if mode != "ar" and mask_token_id is None:
        raise UserError(f"mode {mode!r} needs a mask token: this model was not trained by train.py")
    B, D = block_size, block_size - 1
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
    width = {"ar": 1, "block": 2 * B - 1, "adaptive": 2 * B - 1, "lossless": B * B}[mode]
    longest = max(len(p) for p in prompts)
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if limit and longest + max_new_tokens > limit:
        raise UserError(
            f"a prompt of {longest} tokens + max_new_tokens={max_new_tokens} is longer than the "
            f"model's {limit} positions: shorten it or lower max_new_tokens"
        )
    n_rows = min(batch_size, len(prompts))
    capacity = -(-(longest + max_new_tokens + width + D + 1) // 64) * 64  # +1: padding's slot
    cache = RowCache(
        model.config.get_text_config().num_hidden_layers, n_rows, capacity, cache_device(model)
    )
    step_fn = _compiled(model) if compile else model_forward
    waiting = deque(range(len(prompts)))  # prompts not started yet
    slots = [None] * n_rows  # the Row in each cache row
    results = [None] * len(prompts)
    while waiting or any(slots):
        new = []  # continuous batching: free slots take the next prompts, prefilled together
        for s in range(n_rows):
            if slots[s] is None and waiting:
                slots[s] = Row(waiting[0], prompts[waiting.popleft()], s)
                new.append(slots[s])
        if new:
            items = [step_items(r, mode, mask_token_id, D) for r in new]
            logits = run_forward(
                model, cache, new, items, max(map(len, items)), 1 if mode == "ar" else D + 1,
                model_forward
            )
            finish_forward(new, logits, mode, threshold, B, eos, max_new_tokens, trace)
        busy = [r for r in slots if r is not None and not r.done]
        if busy:  # a compiled step takes every slot (idle ones as padding): one shape, one graph
            rows = (
                [r if r is not None and not r.done else Row(-1, [], s) for s, r in enumerate(slots)]
                if compile
                else busy
            )
            items = [step_items(r, mode, mask_token_id, D) if r.index >= 0 else [] for r in rows]
            keep = {"ar": 1, "lossless": 0}.get(mode, D + 1)
            logits = run_forward(model, cache, rows, items, width, keep, step_fn, fixed=compile)
            finish_forward(
                busy, [lg for r, lg in zip(rows, logits) if r.index >= 0], mode, threshold, B, eos,
                max_new_tokens, trace
            )
        for s, r in enumerate(slots):
            if r is not None and r.done:
                results[r.index] = (r.out, {"forwards": r.forwards, "tokens": len(r.out)})
                slots[s] = None
    return results[0] if single else results


_COMPILED = {}


def _compiled(model):
    """The decoding step, compiled once per model (CUDA graphs on a GPU: shapes never change between
    steps)."""
    if id(model) not in _COMPILED:
        mode = "reduce-overhead" if cache_device(model).type == "cuda" else None
        _COMPILED[id(model)] = torch.compile(model_forward, mode=mode, dynamic=False)
    return _COMPILED[id(model)]


@torch.no_grad()
def teacher_forced(model, ids, spans, block_size, mask_token_id):
    """One forward in the training layout (block offset 0): block_metrics counts (see data.py). With
    block_size 1 it is plain teacher forcing: next-token accuracy over the response."""
    device = cache_device(model)
    ex = data.build_example(
        ids, spans, block_size, mask_token_id if mask_token_id is not None else -1
    )
    batch = {k: v.to(device) for k, v in data.collate([ex], len(ex["input_ids"])).items()
             if isinstance(v, torch.Tensor)}
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                   attention_mask=dense_mask(batch)).logits
    return data.block_metrics(
        logits.argmax(-1).cpu(), {k: v.cpu() for k, v in batch.items()}, block_size
    )


# -------------------------------------------------------------------------------------------------
# grading answers

def boxed(text):
    """The contents of the last \\boxed{...} (or \\fbox{...}) in text, nested braces included; None
    if none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def extract_answer(text, pattern=""):
    """The answer in a text: answer_regex's group 1; else the last \\boxed{..}; else what follows
    "The answer is"; else what follows "####" (GSM8K); else the last number."""
    if pattern:
        m = re.search(pattern, text)
        return m.group(1).strip() if m else None
    found = boxed(text)
    if found is not None:
        return found.strip()
    m = re.search(r"The answer is[:\s]*([^\n]*?)\.?\s*$", text.strip(), re.MULTILINE)
    if m:
        return m.group(1).strip()
    m = re.search(r"####\s*(.+?)\s*$", text.strip(), re.MULTILINE)
    if m:
        return m.group(1).strip()
    numbers = re.findall(r"-?\d[\d,]*\.?\d*", text)
    return numbers[-1].rstrip(".") if numbers else None


def normalize_answer(answer):
    """A canonical form for comparing answers: no surrounding $ or spaces, \\text{..} and
    \\left/\\right unwrapped, \\dfrac as \\frac, a trailing period dropped, numbers as numbers
    (1,234 -> 1234, 1.0 -> 1).
    """
    if answer is None:
        return None
    a = answer.strip().strip("$").strip()
    a = re.sub(r"\\text\{([^{}]*)\}", r"\1", a)
    a = (
        re.sub(r"\\(left|right|!|,|;)", "", a)
        .replace("\\dfrac", "\\frac")
        .replace("\\tfrac", "\\frac")
    )
    a = re.sub(r"\^\{?\\circ\}?", "", a).replace(" ", "").rstrip(".")
    number = a.replace(",", "") if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", a) else a
    try:
        value = float(number)
        return str(int(value)) if value == int(value) and abs(value) < 1e15 else repr(value)
    except (ValueError, OverflowError):
        return a


def same_answer(text, target, pattern=""):
    """(graded, correct): whether the target has an answer, and whether text's answer equals it."""
    want = normalize_answer(extract_answer(target, pattern))
    if want is None:
        return False, False
    return True, normalize_answer(extract_answer(text, pattern)) == want


# -------------------------------------------------------------------------------------------------
# reporting

COLORS = ("\033[38;5;39m", "\033[38;5;208m")


def show(tokenizer, trace, use_color, verbose):
    """The generated text, each forward's tokens in alternating colours; with verbose, top-5 per
    token."""
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
    cells = [list(cols)] + [
        [f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols] for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells)


def gather(obj):
    """Every rank's obj, in rank order (just [obj] on one process)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# -------------------------------------------------------------------------------------------------
# the command line
if __name__ == "__main__":
    wanted = list(SCENARIOS) if scenario == "all" else [s.strip() for s in scenario.split(",")]
    for s in wanted:
        one_of("scenario", s, SCENARIOS + ("all",))
    at_least("num_samples", num_samples, 0)
    at_least("max_new_tokens", max_new_tokens, 1)
    at_least("batch_size", batch_size, 1)
    at_least("block_size", block_size, 0)
    between("threshold", threshold, 0.0, 1.0)
    one_of("dtype", dtype, ("float32", "bfloat16"))
    try:
        re.compile(answer_regex)
    except re.error as e:
        raise UserError(
            f"answer_regex={answer_regex!r} is not a regular expression ({e})"
        ) from None
    if answer_regex and re.compile(answer_regex).groups < 1:
        raise UserError(f"answer_regex={answer_regex!r} needs a group: the answer is group 1")
    if summary_json and not os.path.isdir(os.path.dirname(os.path.abspath(summary_json))):
        raise UserError(f"summary_json={summary_json!r}: its folder does not exist")
    rank, _, world, dev = compute_init(device)
    path = find_hf_folder(ckpt or out_dir)
    tokenizer, model_config = load_tokenizer(path), AutoConfig.from_pretrained(path)
    mask_id = getattr(model_config, "mask_token_id", None)
    trained = getattr(model_config, "next_block_size", None)
    if mask_id is None:
        blocky = [s for s in wanted if s not in ("ar", "tf")]
        if scenario != "all" and blocky:
            raise UserError(
                f"{path} has no mask token (config.mask_token_id): not trained by train.py, so "
                f"{', '.join(blocky)} cannot run; ar and tf can"
            )
        print0(f"note: {path} has no mask token: running ar and tf only")
        wanted = [s for s in wanted if s in ("ar", "tf")]
    if block_size and trained and block_size != trained:
        print0(
            f"warning: block_size={block_size} but the model was trained with {trained}: "
            f"using {trained}"
        )
    block_size = trained or block_size or 4
    options = chat_template_kwargs if chat_template_kwargs is not None else \
        getattr(model_config, "chat_template_kwargs", None) or {}
    conversation = chat.Chat(tokenizer, options, prompt_format)
    if prompt:
        rows = [([{"role": "user", "content": prompt}], 1, None, "--prompt")]
    else:
        rows = chat.read_rows(
            data.expand_files(data_files), prompt_key, response_key, messages_key, tools_key,
            require_target=False
        )[: num_samples or None]
    # (prompt ids, (ids, spans) of the whole conversation or None), reference answer
    samples, encoded = [], []
    for messages, first, tools, where in rows:
        asked, target = chat.split_for_decoding(messages, first)
        try:
            whole = conversation.encode(messages, first, tools)[:2] if target is not None else None
            encoded.append((conversation.prompt_ids(asked, tools), whole))
        except chat.TemplateError as e:
            raise UserError(f"{where}: the chat template refused this conversation: {e}") from None
        samples.append(target)
    eos = conversation.stop_ids()
    model = load_for_decoding(path, dev)[0].to(getattr(torch, dtype))
    mine = list(range(rank, len(samples), world))  # each rank decodes its share
    use_color = sys.stdout.isatty() if color is None else bool(color)
    print0(
        f"checkpoint {path} | block_size {block_size} | mask token {mask_id} | "
        f"{len(samples)} samples | batch_size {batch_size} | device {dev}"
        + (f" x {world} ranks" if world > 1 else "")
    )

    summary, outputs = {}, {}
    for name in wanted:
        t0, counts, results = time.time(), None, {}
        if name in ("tf", "block_tf"):
            B = 1 if name == "tf" else block_size
            for i in mine:
                if encoded[i][1] is not None:
                    ids, spans = encoded[i][1]
                    c = teacher_forced(model, ids, spans, B, mask_id)
                    counts = c if counts is None else counts + c
                    results[i] = (sum(e - s for s, e in spans), 1)
        else:
            trace = [] if 0 in mine else None
            decoded = generate(
                model, [encoded[i][0] for i in mine], name, block_size, mask_id, max_new_tokens,
                eos, threshold, batch_size, trace, compile
            )
            for i, (new, stats) in zip(mine, decoded):
                results[i] = (
                    stats["tokens"],
                    stats["forwards"],
                    tokenizer.decode(new, skip_special_tokens=True),
                )
            if trace is not None:
                print(
                    f"\n[{name}] sample 0, {len(decoded[0][0])} tokens in "
                    f"{decoded[0][1]['forwards']} forwards:"
                )
                print(show(tokenizer, trace, use_color, verbose), flush=True)
        wall = max(gather(time.time() - t0))
        merged = {k: v for part in gather(results) for k, v in part.items()}
        all_counts = [c for c in gather(counts) if c is not None]
        tokens, forwards = sum(r[0] for r in merged.values()), sum(r[1] for r in merged.values())
        row = {
            "scenario": name,
            "samples": len(merged),
            "tokens": tokens,
            "forwards": forwards,
            "tokens/forward": tokens / max(forwards, 1),
            "wall_s": wall,
            "tokens/s": tokens / max(wall, 1e-9),
        }
        if name in ("tf", "block_tf") and all_counts:
            metrics = data.summarize_metrics(sum(all_counts), 1 if name == "tf" else block_size)
            row["accuracy"] = metrics["acc@0"] if name == "tf" else \
                " ".join(f"{metrics[f'acc@{k}']:.2f}" for k in range(block_size))
            row["tokens/forward"] = metrics["tpf_tf"] if name == "block_tf" else ""  # tf: none
        elif name not in ("tf", "block_tf"):
            outputs[name] = {i: r[2] for i, r in merged.items()}
            graded = [same_answer(outputs[name][i], samples[i], answer_regex) for i in outputs[name]
                      if samples[i] is not None]
            if any(g for g, _ in graded):
                row["accuracy"] = sum(c for _, c in graded) / sum(g for g, _ in graded)
        summary[name] = row
    if "ar" in summary:
        for name, row in summary.items():
            if name in MODES:
                row["speedup"] = row["tokens/s"] / max(summary["ar"]["tokens/s"], 1e-9)
        for name in MODES:
            if name != "ar" and name in outputs:
                same = sum(outputs[name][i] == outputs["ar"][i] for i in outputs["ar"])
                summary[name]["same_as_ar"] = f"{same}/{len(outputs['ar'])}"
    columns = (
        "scenario", "samples", "tokens", "forwards", "tokens/forward", "wall_s", "tokens/s",
        "speedup", "accuracy", "same_as_ar"
    )
    print0("\n" + table([{k: r.get(k, "") for k in columns} for r in summary.values()]))
    if summary_json and rank == 0:
        with open(summary_json, "w") as f:
            json.dump(
                {
                    "checkpoint": path,
                    "block_size": block_size,
                    "batch_size": batch_size,
                    "world_size": world,
                    "scenarios": summary,
                },
                f,
                indent=1,
            )
    compute_cleanup()
