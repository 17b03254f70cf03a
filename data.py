"""
data.py: parquet -> chat-rendered token ids -> next-block training rows (DESIGN.md sections 2 and 6).

Top to bottom:
  load_samples     read prompt/target columns from parquet files, validating every row
  render_prompt    a prompt through the chat template (or prompt_format): (text, ids)
  encode           one row: (prompt_ids, response_ids), the <think> overlap removed, end-of-turn appended
  build_example    the next-block layout of one sample: clean tokens + mask groups, labels, attention metadata
  collate          truncate and pack examples into [rows, L] tensors (documents never see each other)
  Batches          deterministic, rank-sharded, epoch-aware iterator with an exact state_dict()
  block_metrics    per-offset accuracy and tpf_tf from predictions on a collated batch
  write_demo_data  the synthetic reasoning data set of the CPU demo
"""
import glob
import os
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from configurator import UserError

ROLES = ("system", "user", "assistant", "tool")
EXAMPLE_KEYS = ("input_ids", "position_ids", "labels", "doc_ids", "is_mask", "limit", "offset", "block_start")
PAD_VALUES = {"input_ids": 0, "position_ids": 0, "labels": -100, "doc_ids": -1, "is_mask": False, "limit": 0,
              "offset": -1, "block_start": False}


# ----------------------------------------------------------------------------------------------------------------
# reading parquet

def expand_files(files):
    """A path, a glob, or a list of them -> sorted list of existing files."""
    patterns = [files] if isinstance(files, str) else list(files or [])
    paths = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise UserError(f"no parquet file matches {pattern!r}")
        for path in matches:
            if not os.path.isfile(path):
                raise UserError(f"data file {path!r} not found")
        paths += matches
    if not paths:
        raise UserError("no data files given")
    return paths


def _messages(value, where, column):
    """A cell as a list of {role, content} messages; a plain string becomes one user message."""
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    if not isinstance(value, (list, tuple)) or not value:
        kind = "an empty list" if isinstance(value, (list, tuple)) else type(value).__name__
        raise UserError(f"{where}: column {column!r} must be a string or a list of {{role, content}} messages, "
                        f"got {kind}")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"{where}: column {column!r} message {i} must have 'role' and 'content'")
        if m["role"] not in ROLES:
            raise UserError(f"{where}: column {column!r} message {i} has unknown role {m['role']!r} "
                            f"(expected one of {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise UserError(f"{where}: column {column!r} message {i} content must be a string, "
                            f"got {type(m['content']).__name__}")
        if not m["content"].strip():
            raise UserError(f"{where}: column {column!r} message {i} has empty content")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _target_text(value, where, column):
    """The target as text: a string as it is, a chat list as its assistant content."""
    if isinstance(value, str):
        if not value.strip():
            raise UserError(f"{where}: column {column!r} is empty")
        return value
    messages = _messages(value, where, column)
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    if not replies:
        raise UserError(f"{where}: column {column!r} has no assistant message")
    return "".join(replies)


def load_samples(files, prompt_key="prompt", response_key="target"):
    """Read (messages, target_text, where) for every row of the parquet file(s), validating as it goes."""
    samples = []
    for path in expand_files(files):
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{path}: cannot read parquet ({str(e).splitlines()[0]})") from None
        for key in (prompt_key, response_key):
            if key not in table.column_names:
                raise UserError(f"{path}: missing column {key!r} (columns: {', '.join(table.column_names)}; "
                                "set prompt_key / response_key)")
        prompts, targets = table.column(prompt_key).to_pylist(), table.column(response_key).to_pylist()
        for row, (prompt, target) in enumerate(zip(prompts, targets)):
            where = f"{path} row {row}"
            samples.append((_messages(prompt, where, prompt_key), _target_text(target, where, response_key), where))
    if not samples:
        raise UserError(f"no samples in {files!r}")
    return samples


# ----------------------------------------------------------------------------------------------------------------
# tokenizing one row

def end_of_turn_id(tokenizer, prompt_format=None):
    """The token that closes an assistant turn in the chat template (e.g. <|im_end|>, <|eot_id|>); EOS when the
    template closes turns with plain text, or when prompts are rendered with prompt_format instead."""
    if prompt_format is None and tokenizer.chat_template:
        sentinel = "\x00SENTINEL\x00"
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": sentinel}], tokenize=False)
        after = text.split(sentinel, 1)[1] if sentinel in text else ""
        ids = tokenizer(after, add_special_tokens=False).input_ids
        special = set(tokenizer.get_added_vocab().values()) | set(tokenizer.all_special_ids)
        if ids and ids[0] in special:
            return ids[0]
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token and no chat template that closes "
                        "turns with a special token: the model could not learn to stop")
    return tokenizer.eos_token_id


def stop_ids(tokenizer, prompt_format=None):
    """The tokens that end a generated answer: the end-of-turn token, and EOS when the tokenizer has one."""
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    return {end_of_turn_id(tokenizer, prompt_format)} | eos


def strip_prompt_overlap(prompt_text, target, added_tokens):
    """Remove from the target the longest start that the rendered prompt already ends with, if that start
    begins with an added/special token (the `<think>\\n` a template appends). Plain-text overlaps stay."""
    shortest = min((len(t) for t in added_tokens if target.startswith(t)), default=0)
    if not shortest:
        return target
    for k in range(min(len(target), len(prompt_text)), shortest - 1, -1):
        if prompt_text.endswith(target[:k]):
            return target[k:]
    return target


def render_prompt(tokenizer, prompt, prompt_format=None):
    """A prompt (a string or a list of {role, content} messages) -> (text, ids), ready for the response.

    Rendered with the chat template (add_generation_prompt=True), or with prompt_format
    (e.g. "Question: {prompt}\nAnswer:") for tokenizers without one."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if prompt_format is not None:
        text = prompt_format.format(prompt="\n\n".join(m["content"] for m in messages))
        return text, tokenizer(text).input_ids  # the tokenizer adds BOS if it uses one
    if not tokenizer.chat_template:
        raise UserError(f"tokenizer {tokenizer.name_or_path!r} has no chat template: set prompt_format, "
                        "e.g. prompt_format = 'Question: {prompt}\\nAnswer: ' in a config file")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text, tokenizer(text, add_special_tokens=False).input_ids  # the template holds BOS if any


def encode(tokenizer, prompt, target, prompt_format=None, end_id=None):
    """One row -> (prompt_ids, response_ids).

    The prompt is rendered by render_prompt. The response is the target minus any start that the generation
    prompt already holds (e.g. `<think>\n`), plus the end-of-turn token, so the model learns to stop. Pass
    end_id (from end_of_turn_id) when encoding many rows."""
    prompt_text, prompt_ids = render_prompt(tokenizer, prompt, prompt_format)
    added = list(tokenizer.get_added_vocab()) + list(tokenizer.all_special_tokens)
    target = strip_prompt_overlap(prompt_text, target, added)
    end_id = end_of_turn_id(tokenizer, prompt_format) if end_id is None else end_id
    return prompt_ids, tokenizer(target, add_special_tokens=False).input_ids + [end_id]


def encode_samples(tokenizer, samples, prompt_format=None):
    """encode() every (messages, target, where) sample -> list of (prompt_ids, response_ids)."""
    end_id = end_of_turn_id(tokenizer, prompt_format)
    return [encode(tokenizer, messages, target, prompt_format, end_id) for messages, target, _ in samples]


def drop_too_long(encoded, max_length, block_size):
    """Drop samples whose prompt alone leaves no room for a response token; count those that will be cut.
    Returns (kept, dropped, truncated). Block offset 0 gives a sample the most masks, so the count is an
    upper bound of what collate will cut."""
    kept, truncated = [], 0
    for prompt_ids, response_ids in encoded:
        if len(prompt_ids) >= max_length:
            continue
        n = len(response_ids)
        truncated += len(prompt_ids) + 2 * n - -(-n // block_size) > max_length
        kept.append((prompt_ids, response_ids))
    return kept, len(encoded) - len(kept), truncated


# ----------------------------------------------------------------------------------------------------------------
# the next-block layout of one sample

def build_example(prompt_ids, response_ids, block_size, mask_token_id, layout="split", block_offset=0):
    """The training row of one sample, DESIGN.md section 2. Returns 1-D tensors of one length:

    input_ids, position_ids, labels   as the model sees them (labels -100 where nothing is supervised)
    doc_ids                           0 here; collate renumbers per row
    is_mask, limit                    the attention metadata of mask.py: a token sees clean tokens with
                                      position < limit (pos + 1 for clean tokens, its block's start for masks)
    offset                            0 for supervised clean tokens, j + 1 for mask M_j, -1 if unsupervised
    block_start                       the clean token whose label is the first token of a block
    last_needed                       response index this token depends on (for truncation in collate)

    The response is cut into blocks of block_size tokens, the first one block_size - block_offset long when
    block_offset > 0. A block of len >= 2 tokens starting at response index a gets len - 1 masks: M_j has
    position P + a + j (that of r_{a+j}, the token it stands in for) and label r_{a+j+1}.
    layout "split" puts all clean tokens first and the mask groups after them; "interleaved" puts each group
    before its block (the seed's picture). Both mean the same thing.
    """
    P, n, B = len(prompt_ids), len(response_ids), block_size
    if not (isinstance(B, int) and B >= 1):
        raise UserError(f"block_size must be an int >= 1, got {B!r}")
    if not (isinstance(block_offset, int) and 0 <= block_offset < B):
        raise UserError(f"block_offset must be an int in [0, {B - 1}] or 'random', got {block_offset!r}")
    if layout not in ("split", "interleaved"):
        raise UserError(f"layout must be 'split' or 'interleaved', got {layout!r}")
    if P < 1 or n < 1:
        raise UserError(f"a sample needs a prompt and a response, got {P} and {n} tokens")
    x = np.asarray(list(prompt_ids) + list(response_ids), dtype=np.int64)
    starts = np.concatenate([[0], np.arange(B - block_offset if block_offset else B, n, B)])  # block starts
    i = np.arange(n)
    block_of = np.searchsorted(starts, i, side="right") - 1  # block index of response token i
    first_of = starts[block_of]                              # a: start of the block of response token i

    # clean tokens: plain causal LM over prompt ++ response
    t = np.arange(P + n)
    clean = dict(
        input_ids=x, position_ids=t, limit=t + 1, is_mask=np.zeros(P + n, bool),
        labels=np.where((t >= P - 1) & (t < P + n - 1), np.append(x[1:], -100), -100),
        offset=np.where((t >= P - 1) & (t < P + n - 1), 0, -1),
        block_start=np.isin(t, P + starts - 1),
        last_needed=t - P,
        sort_block=np.append(np.full(P, -1), first_of), sort_group=np.ones(P + n, int))

    # masks: M stands in for r_i when r_{i+1} is in the same block
    m = i[:-1][block_of[:-1] == block_of[1:]]
    masks = dict(
        input_ids=np.full(len(m), mask_token_id), position_ids=P + m, limit=P + first_of[m],
        is_mask=np.ones(len(m), bool), labels=x[P + m + 1], offset=m - first_of[m] + 1,
        block_start=np.zeros(len(m), bool), last_needed=m + 1,
        sort_block=first_of[m], sort_group=np.zeros(len(m), int))

    both = {k: np.concatenate([clean[k], masks[k]]) for k in clean}
    if layout == "split":
        order = np.arange(P + n + len(m))
    else:  # by block, each block's masks before its clean tokens, each part in position order
        order = np.lexsort((both["position_ids"], both["sort_group"], both["sort_block"]))
    both["doc_ids"] = np.zeros(len(order), dtype=np.int64)
    return {k: torch.from_numpy(both[k][order]) for k in EXAMPLE_KEYS + ("last_needed",)}


# ----------------------------------------------------------------------------------------------------------------
# packing

def truncate(example, max_length):
    """Cut the response so the example fits max_length tokens (masks included); None if not even one response
    token fits. Prompts are never cut."""
    need = example["last_needed"]
    if len(need) <= max_length:
        return example
    n_keep = int(need.sort().values[max_length])  # the largest n with #{need < n} <= max_length
    if n_keep < 1:
        return None
    keep = need < n_keep
    out = {k: v[keep] for k, v in example.items()}
    lost_label = ~out["is_mask"] & (out["last_needed"] + 1 >= n_keep)
    out["labels"] = out["labels"].masked_fill(lost_label, -100)
    out["offset"] = out["offset"].masked_fill(lost_label, -1)
    out["block_start"] = out["block_start"] & ~lost_label
    return out


def collate(examples, max_length, pad_multiple=None, pad_id=0):
    """Pack examples (from build_example) into rows, first fit, and return a dict of [rows, L] tensors plus
    counts 'truncated' and 'dropped'. Each example keeps its own document id in its row (positions restart at
    0 per document); padding sits only at the end of a row, labels -100, doc id -1. Rows are max_length long,
    or, with pad_multiple, the shortest multiple of it that holds the fullest row (fewer shapes to compile).
    An empty input gives one all-padding row, so every rank can still run its forward."""
    fitted, truncated, dropped = [], 0, 0
    for ex in examples:
        cut = truncate(ex, max_length)
        dropped += cut is None
        truncated += cut is not None and cut is not ex
        if cut is not None:
            fitted.append(cut)
    rows, fill = [], []
    for ex in fitted:
        n = len(ex["input_ids"])
        r = next((r for r in range(len(rows)) if fill[r] + n <= max_length), None)
        if r is None:
            rows.append([])
            fill.append(0)
            r = len(rows) - 1
        rows[r].append(ex)
        fill[r] += n
    if not rows:
        rows, fill = [[]], [0]
    L = max_length if pad_multiple is None else max(pad_multiple, -(-max(fill) // pad_multiple) * pad_multiple)
    batch = {}
    for key in EXAMPLE_KEYS:
        pad = pad_id if key == "input_ids" else PAD_VALUES[key]
        out = torch.full((len(rows), L), pad, dtype=torch.bool if isinstance(pad, bool) else torch.long)
        for r, row in enumerate(rows):
            at = 0
            for doc, ex in enumerate(row):
                n = len(ex[key])
                out[r, at:at + n] = doc if key == "doc_ids" else ex[key]
                at += n
        batch[key] = out
    batch["truncated"], batch["dropped"] = truncated, dropped
    return batch


# ----------------------------------------------------------------------------------------------------------------
# the iterator

class Batches:
    """Deterministic, rank-sharded, epoch-aware micro-batches with an exact, saveable position.

    Every optimizer step takes the next `batch_size * micro_steps * world_size` samples of the epoch's shuffled
    order (the same for every world size, so a run on N ranks sees what a run on 1 sees); this rank takes its
    slice and cuts it into micro-batches of batch_size samples. An incomplete last step of an epoch is skipped
    (drop_last). Block offsets are drawn per sample and epoch from the seed, so the position (epoch, step) is
    the whole state."""

    def __init__(self, samples, batch_size, micro_steps, max_length, block_size, mask_token_id, layout="split",
                 block_offset="random", seed=1337, rank=0, world_size=1, shuffle=True, pad_multiple=None,
                 pad_id=0):
        self.samples, self.batch_size, self.micro_steps = samples, batch_size, micro_steps
        self.max_length, self.block_size, self.mask_token_id = max_length, block_size, mask_token_id
        self.layout, self.block_offset, self.seed, self.shuffle = layout, block_offset, seed, shuffle
        self.rank, self.world_size, self.pad_multiple, self.pad_id = rank, world_size, pad_multiple, pad_id
        self.global_batch = batch_size * micro_steps * world_size
        self.steps_per_epoch = len(samples) // self.global_batch
        if self.steps_per_epoch == 0:
            raise UserError(f"{len(samples)} samples are fewer than one optimizer step needs "
                            f"(batch_size {batch_size} x {micro_steps} micro-steps x {world_size} ranks)")
        self.epoch, self.step = 0, 0

    def _epoch_plan(self, epoch):
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.samples)) if self.shuffle else np.arange(len(self.samples))
        if self.block_offset == "random":
            offsets = rng.integers(0, self.block_size, len(self.samples))
        else:
            offsets = np.full(len(self.samples), int(self.block_offset))
        return order, offsets

    def next(self):
        """The micro-batches of this rank for the next optimizer step: a list of micro_steps collated dicts."""
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        order, offsets = self._epoch_plan(self.epoch)
        per_rank = self.batch_size * self.micro_steps
        begin = self.step * self.global_batch + self.rank * per_rank
        mine = order[begin:begin + per_rank]
        self.step += 1
        micro = []
        for k in range(self.micro_steps):
            ids = mine[k * self.batch_size:(k + 1) * self.batch_size]
            examples = [build_example(*self.samples[i], self.block_size, self.mask_token_id, self.layout,
                                      int(offsets[i])) for i in ids]
            micro.append(collate(examples, self.max_length, self.pad_multiple, self.pad_id))
        return micro

    def state_dict(self):
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state):
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


def eval_batches(samples, batch_size, max_length, block_size, mask_token_id, layout="split", rank=0,
                 world_size=1, pad_multiple=None, pad_id=0):
    """Every sample once, in order, block_offset 0, sharded over ranks; every rank gets the same number of
    micro-batches (padding-only ones where it runs out), so collective forwards (FSDP) never hang."""
    chunks = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]
    per_rank = -(-len(chunks) // world_size)
    for k in range(per_rank):
        j = k * world_size + rank
        part = chunks[j] if j < len(chunks) else []
        yield collate([build_example(p, r, block_size, mask_token_id, layout, 0) for p, r in part],
                      max_length, pad_multiple, pad_id)


# ----------------------------------------------------------------------------------------------------------------
# metrics

def block_metrics(pred, batch, block_size):
    """Counts for per-offset accuracy and tpf_tf, as one float tensor to all-reduce:
    [correct@0..B-1, total@0..B-1, accepted, blocks]. acc@k = correct/total; tpf_tf = accepted/blocks, where a
    block accepts 1 + the length of the correct prefix of its mask predictions (what lossless decoding would
    reach under teacher forcing). pred: argmax ids shaped like batch['labels']."""
    B = block_size
    offset, labels = batch["offset"].flatten(), batch["labels"].flatten()
    ok = (pred.flatten() == labels) & (offset >= 0)
    counts = torch.zeros(2 * B + 2, dtype=torch.float64)
    counts[:B] = torch.bincount(offset[ok], minlength=B)[:B].double()
    counts[B:2 * B] = torch.bincount(offset[offset >= 0], minlength=B)[:B].double()
    # masks of one group sit together, in offset order 1, 2, ...: a mask counts when no mask before it in its
    # group (itself included) is wrong
    mask_ok = ok[offset >= 1]
    group = torch.cumsum((offset[offset >= 1] == 1).long(), 0)
    wrong = torch.cumsum((~mask_ok).long(), 0)
    wrong_before_group = torch.zeros(int(group.max()) + 1 if len(group) else 1, dtype=torch.long)
    starts = offset[offset >= 1] == 1
    wrong_before_group[group[starts]] = (wrong - (~mask_ok).long())[starts]
    prefix_ok = (wrong - wrong_before_group[group]) == 0
    counts[2 * B] = float(batch["block_start"].sum() + prefix_ok.sum())
    counts[2 * B + 1] = float(batch["block_start"].sum())
    return counts


def summarize_metrics(counts, block_size):
    B = block_size
    out = {f"acc@{k}": (counts[k] / counts[B + k]).item() if counts[B + k] else float("nan") for k in range(B)}
    out["tpf_tf"] = (counts[2 * B] / counts[2 * B + 1]).item() if counts[2 * B + 1] else float("nan")
    return out


# ----------------------------------------------------------------------------------------------------------------
# the demo data set

def demo_problem(rng):
    """Add two 3-digit numbers column by column, as taught in school: one line per column, named u(nits),
    t(ens), h(undreds), each `digit+digit+carry=two-digit sum`, then the answer."""
    a, b = rng.randint(100, 999), rng.randint(100, 999)
    steps, carry, answer = [], 0, ""
    for column, da, db in zip("uth", str(a)[::-1], str(b)[::-1]):
        total = int(da) + int(db) + carry
        steps.append(f"{column}:{da}+{db}+{carry}={total:02d}")
        answer, carry = str(total % 10) + answer, total // 10
    answer = (str(carry) if carry else "") + answer
    return f"What is {a}+{b}?", "<think>\n" + "\n".join(steps) + "\n</think>\nThe answer is " + answer + "."


def write_demo_data(out_dir, n_train=3600, n_test=200, seed=0):
    """Write train.parquet and test.parquet (chat-list prompt/target columns, as the seed's format) into
    out_dir, deterministically; test problems never occur in train. Skips files that already exist."""
    paths = {split: os.path.join(out_dir, f"{split}.parquet") for split in ("train", "test")}
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    os.makedirs(out_dir, exist_ok=True)
    rng, seen, rows = random.Random(seed), set(), {"test": [], "train": []}
    for split, count in (("test", n_test), ("train", n_train)):
        while len(rows[split]) < count:
            question, target = demo_problem(rng)
            if question in seen:
                continue
            seen.add(question)
            rows[split].append({"prompt": [{"role": "user", "content": question}],
                                "target": [{"role": "assistant", "content": target}]})
    for split, path in paths.items():
        tmp = path + ".tmp"
        pq.write_table(pa.Table.from_pylist(rows[split]), tmp)
        os.replace(tmp, path)
    return paths
