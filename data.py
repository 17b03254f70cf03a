"""
data.py: parquet -> token ids, tokenized once into a memory-mapped store -> next-block training rows
(docs/design.md, "The layout" and "The data path").

Top to bottom:
  expand_files     a path, a glob or a list of them -> the files
  Store            encoded samples as flat arrays (token ids, offsets, learned spans), memory-mapped
  load_store       the store of some files: found in the cache by a key over everything that
                   decides the tokens, or built once (worker processes, the tokenizer's batched
                   call) by local rank 0 of each node
  build_example    the next-block layout of one sample: clean tokens + mask groups, labels,
                   attention metadata
  collate          truncate and pack examples into [rows, L] tensors (documents never meet)
  Batches          deterministic, rank-sharded, epoch-aware iterator (samples or a token budget per
                   micro-batch)
  block_metrics    per-offset accuracy and tpf_tf from predictions on a collated batch
  write_demo_data  the synthetic reasoning data set of the CPU demo

    python data.py config/x.py      # build the stores of train_files and val_files before a launch
"""

import bisect
import glob
import hashlib
import inspect
import json
import multiprocessing
import os
import random
import shutil
import time
import zlib
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

import chat
from configurator import UserError, one_of

EXAMPLE_KEYS = (
    "input_ids", "position_ids", "labels", "doc_ids", "is_mask", "limit", "offset", "block_start"
)
PAD_VALUES = {
    "input_ids": 0,
    "position_ids": 0,
    "labels": -100,
    "doc_ids": -1,
    "is_mask": False,
    "limit": 0,
    "offset": -1,
    "block_start": False,
}
STORE_FILES = ("ids.bin", "offsets.npy", "spans.npy", "span_offsets.npy", "source.npy")


# -------------------------------------------------------------------------------------------------
# data files

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


# -------------------------------------------------------------------------------------------------
# the store: every sample's token ids and supervised spans, as flat arrays

class Store:
    """Encoded samples: token ids (uint32, one flat array; memory-mapped when read from disk, so
    that the OS keeps one copy for every rank of a node) and each sample's supervised spans ([start,
    end) within the sample). Sample i is ids[starts[i]:ends[i]] with
    spans[span_starts[i]:span_ends[i]]. store[i] -> (ids, spans). On disk: ids.bin, offsets.npy (n +
    1), spans.npy (m x 2), span_offsets.npy (n + 1), meta.json.
    """

    def __init__(self, ids, offsets, spans, span_offsets, source=None, info=None):
        self.ids, self.spans, self.info = ids, spans, info or {}
        self.starts, self.ends = offsets[:-1], offsets[1:]
        self.span_starts, self.span_ends = span_offsets[:-1], span_offsets[1:]
        self.source = source  # [n, 2]: the file (index into info["files"]) and row of each sample

    @classmethod
    def from_samples(cls, samples):
        """A store in memory from (ids, spans) pairs (tests, small data)."""
        ids = [np.asarray(i, dtype=np.uint32) for i, _ in samples]
        spans = [np.asarray(s, dtype=np.int64).reshape(-1, 2) for _, s in samples]
        return cls(np.concatenate(ids) if ids else np.zeros(0, np.uint32),
                   np.concatenate([[0], np.cumsum([len(i) for i in ids], dtype=np.int64)]),
                   np.concatenate(spans) if spans else np.zeros((0, 2), np.int64),
                   np.concatenate([[0], np.cumsum([len(s) for s in spans], dtype=np.int64)]))

    @classmethod
    def open(cls, folder):
        """The store in folder, memory-mapped; ValueError if a file is missing or not the size
        meta.json says."""
        with open(os.path.join(folder, "meta.json")) as f:
            info = json.load(f)
        for name in STORE_FILES:
            size = os.path.getsize(os.path.join(folder, name))
            if size != info["sizes"][name]:
                raise ValueError(f"{name} is {size} bytes, not {info['sizes'][name]}")
        ids = (
            np.memmap(os.path.join(folder, "ids.bin"), dtype=np.uint32, mode="r")
            if info["tokens"]
            else np.zeros(0, np.uint32)
        )
        return cls(
            ids, *(np.load(os.path.join(folder, name)) for name in STORE_FILES[1:]), info=info
        )

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        return (self.ids[self.starts[i]:self.ends[i]],
                self.spans[self.span_starts[i]:self.span_ends[i]].tolist())

    def select(self, keep):
        """The samples at the indices keep, as a store (the token ids stay where they are)."""
        out = Store.__new__(Store)
        out.ids, out.spans, out.info = self.ids, self.spans, self.info
        out.starts, out.ends = self.starts[keep], self.ends[keep]
        out.span_starts, out.span_ends = self.span_starts[keep], self.span_ends[keep]
        out.source = None if self.source is None else self.source[keep]
        return out

    def where(self, i):
        """"file row N" of sample i, or "sample i" for a store made in memory."""
        if self.source is None or not self.info.get("files"):
            return f"sample {i}"
        return f"{self.info['files'][self.source[i][0]]} row {self.source[i][1]}"

    # the lengths the layout and the token budget need, without reading a token
    def clean_lengths(self):
        return self.ends - self.starts

    def span_lengths(self):
        """(the length of every span, sample by sample, and the sample each belongs to)."""
        counts = self.span_ends - self.span_starts
        index = np.repeat(
            self.span_starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts
        ) + np.arange(counts.sum())
        spans = self.spans[index]
        return spans[:, 1] - spans[:, 0], np.repeat(np.arange(len(self)), counts)

    def first_span_start(self):
        return self.spans[self.span_starts, 0]


def tokenizer_fingerprint(tokenizer):
    """What decides how this tokenizer turns text into ids: its vocabulary, merges, added and
    special tokens (the fast tokenizer's full definition), and its chat template."""
    backend = (
        tokenizer.backend_tokenizer.to_str()
        if hasattr(tokenizer, "backend_tokenizer")
        else repr(tokenizer)
    )
    special = {
        k: str(getattr(tokenizer, k, None))
        for k in ("bos_token", "eos_token", "pad_token", "unk_token")
    }
    return hashlib.sha256(
        (backend + str(tokenizer.chat_template) + json.dumps(special)).encode()
    ).hexdigest()


def file_checksum(path, cache):
    """crc32 of a file's bytes, remembered in cache by (size, mtime) so that an unchanged file is
    read once."""
    st = os.stat(path)
    key = os.path.abspath(path)
    hit = cache.get(key)
    if hit and hit[:2] == [st.st_size, st.st_mtime_ns]:
        return hit[2]
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    cache[key] = [st.st_size, st.st_mtime_ns, crc]
    return crc


def store_key(paths, conversation, keys, cache_dir):
    """A hash of everything that decides the tokens: the data files' contents, the tokenizer and its
    chat template, the template options and prompt_format, the column keys, and chat.py's rules
    themselves.
    """
    crc_file = os.path.join(cache_dir, "checksums.json")
    try:
        with open(crc_file) as f:
            crcs = json.load(f)
    except (OSError, ValueError):
        crcs = {}
    files = [[os.path.abspath(p), os.path.getsize(p), file_checksum(p, crcs)] for p in paths]
    try:  # a cache of checksums only: losing it costs one read of the files
        tmp = f"{crc_file}.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(crcs, f)
        os.replace(tmp, crc_file)
    except OSError:
        pass
    what = {
        "files": files,
        "tokenizer": tokenizer_fingerprint(conversation.tok),
        "options": conversation.options,
        "prompt_format": conversation.prompt_format,
        "special_text": conversation.special_text,
        "keys": keys,
        "rules": hashlib.sha256(inspect.getsource(chat).encode()).hexdigest(),
        "version": 1,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:20]


_WORKER = {}


def _encode_chunk(task):
    """A worker's share: (rows of one parquet batch) -> flat arrays, notes and template errors."""
    conversation, keys, require_target = _WORKER["chat"], _WORKER["keys"], _WORKER["require_target"]
    path, row0, table = task
    rows = chat.rows_of_table(table, path, row0, *keys, require_target=require_target)
    results = conversation.encode_many([(m, first, tools) for m, first, tools, _ in rows])
    ids, lengths, spans, counts, notes, errors, source = [], [], [], [], [], [], []
    for row, ((_, _, _, where), result) in enumerate(zip(rows, results), row0):
        if isinstance(result, chat.TemplateError):
            errors.append((where, str(result)))
            continue
        sample_ids, sample_spans, row_notes = result
        notes += [(note, where) for note in sorted(row_notes)]
        if sample_ids is None:  # dropped (special_text='drop')
            continue
        ids.append(np.asarray(sample_ids, dtype=np.uint32))
        lengths.append(len(sample_ids))
        spans += sample_spans
        counts.append(len(sample_spans))
        source.append((_WORKER["paths"].index(path), row))
    return (
        np.concatenate(ids) if ids else np.zeros(0, np.uint32), lengths, spans, counts, notes,
        errors, len(rows), source
    )


def build_store(folder, paths, conversation, keys, workers, require_target=True, rows_per_task=256):
    """Encode every row of the files into a store in folder (written as folder.tmp-PID, renamed when
    complete). Rows go to worker processes in batches of rows_per_task; each tokenizes its rows in
    one batched call. Returns the store's info (counts, notes, time), or raises UserError listing
    rows the template refused.
    """
    t0 = time.time()
    tmp = f"{folder}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    offsets, span_counts = [0], [0]  # cumulative token and span counts per sample
    span_list, source, errors = [], [], []
    notes, n_rows = Counter(), 0
    first_where = {}

    def tasks():
        for path in paths:
            try:
                source = pq.ParquetFile(path)
                chat.check_columns(
                    source.schema_arrow.names, path, *keys[:3], require_target=require_target
                )
                row0 = 0
                for batch in source.iter_batches(batch_size=rows_per_task):
                    yield path, row0, pa.Table.from_batches([batch])
                    row0 += batch.num_rows
            except (pa.ArrowException, OSError) as e:
                raise UserError(f"{path}: cannot read parquet ({str(e).splitlines()[0]})") from None

    _WORKER.update(chat=conversation, keys=keys, require_target=require_target, paths=paths)
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(_encode_chunk, tasks()) if pool else map(_encode_chunk, tasks())
        with open(os.path.join(tmp, "ids.bin"), "wb") as out:
            for ids, lengths, spans, counts, row_notes, row_errors, rows, row_source in results:
                out.write(ids.tobytes())
                offsets += (offsets[-1] + np.cumsum(lengths)).tolist() if lengths else []
                span_list += spans
                span_counts += (span_counts[-1] + np.cumsum(counts)).tolist() if counts else []
                for note, where in row_notes:
                    notes[note] += 1
                    first_where.setdefault(note, where)
                errors += row_errors
                n_rows += rows
                source += row_source
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(
            f"cannot write the data store in {os.path.dirname(folder)}: {e.strerror} (the data "
            "files are untouched; free the space or set data_cache)"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if pool:
            pool.terminate()
    if errors:
        shutil.rmtree(tmp, ignore_errors=True)
        shown = "; ".join(f"{where}: {message}" for where, message in errors[:3])
        raise UserError(
            f"{len(errors)} of {n_rows} rows cannot be rendered by the chat template ({shown}"
            f"{'; ...' if len(errors) > 3 else ''}): fix or drop them, or set chat_template_kwargs"
        )
    arrays = {"offsets.npy": np.asarray(offsets, np.int64),
              "spans.npy": np.asarray(span_list, np.int64).reshape(-1, 2),
              "span_offsets.npy": np.asarray(span_counts, np.int64),
              "source.npy": np.asarray(source, np.int64).reshape(-1, 2)}
    try:
        for name, array in arrays.items():
            np.save(os.path.join(tmp, name), array)
        info = {
            "samples": len(offsets) - 1,
            "rows": n_rows,
            "tokens": int(offsets[-1]),
            "files": paths,
            "notes": {k: [v, first_where[k]] for k, v in notes.items()},
            "build_seconds": time.time() - t0,
            "sizes": {name: os.path.getsize(os.path.join(tmp, name)) for name in STORE_FILES},
        }
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(info, f, indent=1)
        os.replace(tmp, folder)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.isdir(folder):  # another process built the same store first
            return Store.open(folder).info
        raise UserError(
            f"cannot write the data store in {os.path.dirname(folder)}: {e.strerror} (the data "
            "files are untouched; free the space or set data_cache)"
        ) from None
    return info


def load_store(
    files, conversation, cache_dir, keys=("prompt", "target", "messages", "tools"), workers=0,
    require_target=True, builder=True, wait=lambda: None
):
    """The store of files: opened from cache_dir/<key>/ when it is there and intact, else built
    there (by the process with builder=True: local rank 0 of each node; the others call wait(), then
    open it). Returns (store, key, built: seconds it took or None when it was found)."""
    paths = expand_files(files)
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"data_cache {cache_dir!r} cannot be created: {e.strerror}") from None
    if builder and not os.access(cache_dir, os.W_OK):
        raise UserError(
            f"data_cache {cache_dir!r} is not writable: set data_cache to a folder you can write"
        )
    key = store_key(paths, conversation, list(keys), cache_dir)
    folder = os.path.join(cache_dir, key)
    built = None
    if builder:
        try:
            Store.open(folder)
        except (OSError, ValueError, KeyError):
            shutil.rmtree(folder, ignore_errors=True)  # missing, partial or corrupt: build it again
            built = build_store(
                folder, paths, conversation, list(keys), workers or len(os.sched_getaffinity(0)),
                require_target
            )["build_seconds"]
    wait()
    try:
        return Store.open(folder), key, built
    except (OSError, ValueError, KeyError) as e:
        raise UserError(
            f"the data store {folder} cannot be read ({e}): delete it and start again"
        ) from None


# -------------------------------------------------------------------------------------------------
# the next-block layout of one sample

def block_starts(n, block_size, offset):
    """Where the blocks of an n-token response start: 0, then every block_size tokens after a first
    block of block_size - offset tokens (offset > 0) or block_size tokens (offset 0)."""
    return np.concatenate(
        [[0], np.arange(block_size - offset if offset else block_size, n, block_size)]
    )


def build_example(ids, spans, block_size, mask_token_id, layout="split", offsets=0):
    """The training row of one sample (docs/design.md, "The layout"). ids: the clean token ids of
    the whole sample; spans: the [start, end) index ranges of ids that are supervised (the response;
    every assistant turn of a conversation); offsets: the block offset of each span (an int for
    all). Returns 1-D tensors:

    input_ids, position_ids, labels   as the model sees them (labels -100 where nothing is
                                      supervised)
    doc_ids                           0 here; collate renumbers per row
    is_mask, limit                    the attention metadata of mask.py: a token sees clean tokens
                                      with position < limit (pos + 1 for clean tokens, its block's
                                      start for masks)
    offset                            0 for supervised clean tokens, j + 1 for mask M_j, -1 if
                                      unsupervised
    block_start                       the clean token whose label is the first token of a block
    last_needed                       the clean index this token depends on (for truncation in
                                      collate)

    Each span is cut into blocks of block_size tokens, the first one block_size - offset long when
    offset > 0. A block of len >= 2 tokens starting at index a gets len - 1 masks: M_j has position
    a + j (that of the token it stands in for), label ids[a + j + 1], and sees the clean tokens
    before a: the prompt, earlier turns, earlier blocks. layout "split" puts all clean tokens first
    and the mask groups after them; "interleaved" puts each group before its block (the seed's
    picture). Both mean the same thing.
    """
    B = block_size
    if not (isinstance(B, int) and B >= 1):
        raise UserError(f"block_size must be an int >= 1, got {B!r}")
    one_of("layout", layout, ("split", "interleaved"))
    x = np.asarray(ids, dtype=np.int64)
    T = len(x)
    offsets = np.broadcast_to(np.asarray(offsets), (len(spans),))
    targets, firsts = [], []  # every supervised index, and the start of its block
    for (s, e), o in zip(spans, offsets.tolist()):
        if not (isinstance(o, int) and 0 <= o < B):
            raise UserError(f"block_offset must be an int in [0, {B - 1}] or 'random', got {o!r}")
        if not 1 <= s < e <= T:
            raise UserError(f"a sample needs a prompt and a response: span {(s, e)} of {T} tokens")
        i = np.arange(e - s)
        starts = block_starts(e - s, B, o)
        targets.append(s + i)
        firsts.append(s + starts[np.searchsorted(starts, i, side="right") - 1])
    if not targets:
        raise UserError("a sample needs a prompt and a response: no supervised span")
    target, first = np.concatenate(targets), np.concatenate(firsts)
    if mask_token_id is not None and mask_token_id >= 0 and (x == mask_token_id).any():
        raise UserError(
            f"the mask token (id {mask_token_id}) appears among a sample's clean tokens, at index "
            f"{int(np.argmax(x == mask_token_id))}: the clean stream must never see a mask"
        )

    # clean tokens: a plain causal LM over the whole sample, supervised where the next token is a
    # target
    t = np.arange(T)
    supervised = np.zeros(T, bool)
    supervised[target - 1] = True
    clean = dict(
        input_ids=x,
        position_ids=t,
        limit=t + 1,
        is_mask=np.zeros(T, bool),
        labels=np.where(supervised, np.append(x[1:], -100), -100),
        offset=np.where(supervised, 0, -1),
        block_start=np.isin(t, np.unique(first) - 1),
        last_needed=t,
        anchor=t,
        group=np.ones(T, int),
    )

    # masks: M stands in for target i when target i + 1 is in the same block
    m = np.flatnonzero((target[1:] == target[:-1] + 1) & (first[1:] == first[:-1]))
    pos = target[m]
    masks = dict(
        input_ids=np.full(len(m), mask_token_id),
        position_ids=pos,
        limit=first[m],
        is_mask=np.ones(len(m), bool),
        labels=x[pos + 1],
        offset=pos - first[m] + 1,
        block_start=np.zeros(len(m), bool),
        last_needed=pos + 1,
        anchor=first[m],
        group=np.zeros(len(m), int),
    )

    both = {k: np.concatenate([clean[k], masks[k]]) for k in clean}
    if layout == "split":
        order = np.arange(len(both["input_ids"]))
    else:  # each block's masks right before its first clean token; each part in position order
        order = np.lexsort((both["position_ids"], both["group"], both["anchor"]))
    both["doc_ids"] = np.zeros(len(order), dtype=np.int64)
    return {k: torch.from_numpy(both[k][order]) for k in EXAMPLE_KEYS + ("last_needed",)}


# -------------------------------------------------------------------------------------------------
# packing

def truncate(example, max_length):
    """Cut the end of the sample so the example fits max_length tokens (masks included): the same as
    building it from the shorter sample. None if not even one supervised token fits. Prompts are
    never cut."""
    need = example["last_needed"]
    if len(need) <= max_length:
        return example
    n_keep = int(need.sort().values[max_length])  # the largest n with #{need < n} <= max_length
    labelled = example["labels"] != -100
    first_target = int(need[labelled & ~example["is_mask"]].min()) + 1 if labelled.any() else 0
    if n_keep <= first_target:
        return None
    keep = need < n_keep
    out = {k: v[keep] for k, v in example.items()}
    lost_label = ~out["is_mask"] & (out["last_needed"] + 1 >= n_keep)
    out["labels"] = out["labels"].masked_fill(lost_label, -100)
    out["offset"] = out["offset"].masked_fill(lost_label, -1)
    out["block_start"] = out["block_start"] & ~lost_label
    return out


def collate(examples, max_length, pad_multiple=None, pad_id=0, rows=None):
    """Pack examples (from build_example) into rows and return a dict of [rows, L] tensors plus
    counts 'truncated' and 'dropped'. Rows are filled first fit, or as given (rows: lists of indices
    into examples). Each example keeps its own document id in its row (positions restart at 0 per
    document); padding sits only at the end of a row, labels -100, doc id -1. Rows are max_length
    long, or, with pad_multiple, the shortest multiple of it that holds the fullest row (fewer
    shapes to compile). An empty input gives one all-padding row, so every rank can still run its
    forward."""
    fitted, truncated, dropped = [], 0, 0
    for ex in examples:
        cut = truncate(ex, max_length)
        dropped += cut is None
        truncated += cut is not None and cut is not ex
        fitted.append(cut)
    if rows is not None:
        rows = [[fitted[i] for i in row if fitted[i] is not None] for row in rows]
        fill = [sum(len(ex["input_ids"]) for ex in row) for row in rows]
    else:
        rows, fill = [], []
        for ex in (ex for ex in fitted if ex is not None):
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
    L = (
        max_length
        if pad_multiple is None
        else max(pad_multiple, -(-max(fill) // pad_multiple) * pad_multiple)
    )
    batch = {}
    for key in EXAMPLE_KEYS:
        pad = pad_id if key == "input_ids" else PAD_VALUES[key]
        out = torch.full(
            (len(rows), L), pad, dtype=torch.bool if isinstance(pad, bool) else torch.long
        )
        for r, row in enumerate(rows):
            at = 0
            for doc, ex in enumerate(row):
                n = len(ex[key])
                out[r, at:at + n] = doc if key == "doc_ids" else ex[key]
                at += n
        batch[key] = out
    batch["truncated"], batch["dropped"] = truncated, dropped
    return batch


def as_store(samples):
    return samples if isinstance(samples, Store) else Store.from_samples(samples)


def too_long(samples, max_length, block_size):
    """(indices of the samples to keep, dropped, truncated): a sample whose prompt (everything
    before its first supervised token) fills max_length is dropped; one whose example (masks
    included, block offset 0: the most masks) is longer than max_length will be cut, response side.
    From the stored lengths: nothing is read.
    """
    samples = as_store(samples)
    keep = np.flatnonzero(samples.first_span_start() < max_length)
    lengths = example_lengths(samples, block_size, np.zeros(len(samples.spans), np.int64))
    return keep, len(samples) - len(keep), int((lengths[keep] > max_length).sum())


def example_lengths(samples, block_size, span_offsets):
    """len(build_example(...)) of every sample: clean tokens + masks (len - 1 per block of a
    span)."""
    span_len, owner = samples.span_lengths()
    o = np.asarray(span_offsets)[:len(span_len)]
    first = np.where(o > 0, block_size - o, block_size)
    blocks = 1 + np.where(span_len > first, -(-(span_len - first) // block_size), 0)
    masks = np.bincount(owner, weights=span_len - blocks, minlength=len(samples)).astype(np.int64)
    return samples.clean_lengths() + masks


# -------------------------------------------------------------------------------------------------
# the iterator

class Batches:
    """Deterministic, rank-sharded, epoch-aware micro-batches with an exact, saveable position.

    batch_size mode (batch_tokens=0): every optimizer step takes the next `batch_size * micro_steps
    * world_size` samples of the epoch's shuffled order; this rank takes its slice and cuts it into
    micro-batches of batch_size samples. The position is (epoch, samples consumed), which means the
    same for any batch geometry: a run resumed with another batch_size, accumulation or world size
    goes on with the next unseen sample. An epoch ends when fewer samples are left than a step takes
    (they are skipped: drop_last).

    batch_tokens mode: each micro-batch is batch_tokens // L rows of L = min(max_length,
    batch_tokens) tokens (masks included), filled from a window of the shuffled order, largest
    sample that fits first, so that rows end up full and every step costs about the same. An epoch
    is a fixed plan of micro-batches; a step takes the next micro_steps * world_size of them, rank r
    the r-th share. The position is (epoch, micro-batches consumed): resumable with any accumulation
    or world size, not with another batch_tokens or max_length.

    Either way the plan comes from the seed and the epoch alone, so a run on N ranks sees what a run
    on 1 sees. Block offsets are drawn per span (each assistant turn) and epoch."""

    def __init__(
        self, samples, batch_size, micro_steps, max_length, block_size, mask_token_id,
        layout="split", block_offset="random", seed=1337, rank=0, world_size=1, shuffle=True,
        pad_multiple=None, pad_id=0, batch_tokens=0
    ):
        self.samples = as_store(samples)
        self.batch_size, self.micro_steps, self.batch_tokens = batch_size, micro_steps, batch_tokens
        self.max_length, self.block_size, self.mask_token_id = max_length, block_size, mask_token_id
        self.layout, self.block_offset = layout, block_offset
        self.seed, self.shuffle = seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.pad_multiple, self.pad_id = pad_multiple, pad_id
        counts = self.samples.span_ends - self.samples.span_starts
        self.first_offset = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self.epoch, self.consumed, self._plans = 0, 0, {}
        self.step_samples = []  # the sample ids of the last step, all ranks (to audit resumes)
        n = len(self.samples)
        if batch_tokens:
            self.row_length = min(max_length, batch_tokens)
            self.rows = batch_tokens // self.row_length
            prompts = self.samples.first_span_start()
            if (prompts >= self.row_length).any():
                i = int(np.argmax(prompts >= self.row_length))
                raise UserError(
                    f"{self.samples.where(i)}: its prompt alone has {prompts[i]} tokens, not fewer "
                    f"than batch_tokens={batch_tokens}: raise batch_tokens (or lower max_length)"
                )
            self.global_batch = micro_steps * world_size  # micro-batches per step
            self.steps_per_epoch = len(self._plan(0)) // self.global_batch
            if self.steps_per_epoch == 0:
                raise UserError(
                    f"{n} samples fill {len(self._plan(0))} micro-batches of "
                    f"batch_tokens={batch_tokens}, fewer than one optimizer step needs "
                    f"({micro_steps} micro-steps x {world_size} ranks)"
                )
        else:
            self.global_batch = batch_size * micro_steps * world_size
            self.steps_per_epoch = n // self.global_batch
            if self.steps_per_epoch == 0:
                raise UserError(
                    f"{n} samples are fewer than one optimizer step needs "
                    f"(batch_size {batch_size} x {micro_steps} micro-steps x {world_size} ranks)"
                )

    def _epoch_plan(self, epoch):
        """The epoch's order of samples and the block offset of every span."""
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self.samples)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        n_spans = int((self.samples.span_ends - self.samples.span_starts).sum())
        if self.block_offset == "random":
            offsets = rng.integers(0, self.block_size, n_spans)
        else:
            offsets = np.full(n_spans, int(self.block_offset))
        return order, offsets

    def _plan(self, epoch):
        """batch_tokens mode: the epoch's micro-batches, each a list of rows of sample ids."""
        if epoch not in self._plans:
            order, offsets = self._epoch_plan(epoch)
            L, R = self.row_length, self.rows
            lengths = np.minimum(example_lengths(self.samples, self.block_size, offsets), L)[
                order
            ].tolist()
            window = int(np.clip(16 * R * L / max(1.0, float(np.mean(lengths))), 32, 4096))
            pool_len, pool_id, taken, micro = [], [], 0, []

            def refill():
                nonlocal taken
                while len(pool_len) < window and taken < len(order):
                    at = bisect.bisect_right(pool_len, lengths[taken])
                    pool_len.insert(at, lengths[taken])
                    pool_id.insert(at, int(order[taken]))
                    taken += 1

            refill()
            while pool_len and (taken < len(order) or sum(pool_len) >= R * L):
                rows = []
                for _ in range(R):
                    space, row = L, []
                    while (
                        j := bisect.bisect_right(pool_len, space) - 1
                    ) >= 0:  # the largest that fits
                        space -= pool_len.pop(j)
                        row.append(pool_id.pop(j))
                        refill()
                    rows.append(row)
                micro.append(rows)
            self._plans = {epoch: micro}  # one epoch at a time in memory
        return self._plans[epoch]

    def next(self):
        """The micro-batches of this rank for the next optimizer step: a list of micro_steps
        collated dicts."""
        per_rank = self.micro_steps if self.batch_tokens else self.batch_size * self.micro_steps
        limit = len(self._plan(self.epoch)) if self.batch_tokens else len(self.samples)
        if self.consumed + self.global_batch > limit:
            self.epoch, self.consumed = self.epoch + 1, 0
        order, offsets = self._epoch_plan(self.epoch)
        if self.batch_tokens:
            step = self._plan(self.epoch)[self.consumed:self.consumed + self.global_batch]
            self.step_samples = [i for mb in step for row in mb for i in row]
            micro_rows = step[self.rank * per_rank:(self.rank + 1) * per_rank]
        else:
            step = order[self.consumed:self.consumed + self.global_batch]
            self.step_samples = step.tolist()
            mine = step[self.rank * per_rank:(self.rank + 1) * per_rank]
            micro_rows = [
                [mine[k * self.batch_size : (k + 1) * self.batch_size].tolist()]
                for k in range(self.micro_steps)
            ]
        self.consumed += self.global_batch
        micro = []
        for mb in micro_rows:
            ids = [i for row in mb for i in row]
            examples = [self.example(i, offsets) for i in ids]
            if self.batch_tokens:  # the planned rows, each row_length long
                at, rows = 0, []
                for row in mb:
                    rows.append(list(range(at, at + len(row))))
                    at += len(row)
                micro.append(collate(examples, self.row_length, None, self.pad_id, rows))
            else:
                micro.append(collate(examples, self.max_length, self.pad_multiple, self.pad_id))
        return micro

    def example(self, i, offsets):
        ids, spans = self.samples[i]
        first = self.first_offset[i]
        return build_example(ids, spans, self.block_size, self.mask_token_id, self.layout,
                             offsets[first:first + len(spans)].tolist())

    def padding(self, epoch=0):
        """The fraction of row tokens that are padding over the epoch's micro-batches (before
        truncation)."""
        order, offsets = self._epoch_plan(epoch)
        lengths = example_lengths(self.samples, self.block_size, offsets)
        if self.batch_tokens:
            plan = self._plan(epoch)
            real = sum(min(lengths[i], self.row_length) for mb in plan for row in mb for i in row)
            return 1 - real / max(1, len(plan) * self.rows * self.row_length)
        real = total = 0
        for s in range(self.steps_per_epoch * self.micro_steps * self.world_size):
            chunk = np.minimum(
                lengths[order[s * self.batch_size : (s + 1) * self.batch_size]], self.max_length
            )
            fill = []
            for n in chunk.tolist():  # collate's first fit
                r = next((r for r in range(len(fill)) if fill[r] + n <= self.max_length), None)
                if r is None:
                    fill.append(n)
                else:
                    fill[r] += n
            L = self.max_length if self.pad_multiple is None else \
                max(self.pad_multiple, -(-max(fill) // self.pad_multiple) * self.pad_multiple)
            real, total = real + sum(fill), total + len(fill) * L
        return 1 - real / max(1, total)

    def state_dict(self):
        state = {"epoch": self.epoch, "consumed": self.consumed}
        if self.batch_tokens:
            state.update(
                unit="micro_batches", batch_tokens=self.batch_tokens, max_length=self.max_length
            )
        return state

    def load_state_dict(self, state):
        unit = state.get("unit", "samples")
        if unit != ("micro_batches" if self.batch_tokens else "samples") or (
            self.batch_tokens
            and (state["batch_tokens"], state["max_length"]) != (self.batch_tokens, self.max_length)
        ):
            was = f"batch_tokens={state['batch_tokens']}, max_length={state['max_length']}" \
                if unit == "micro_batches" else "batch_size (a count of samples)"
            raise UserError(
                f"the checkpoint's data position counts micro-batches of {was}; this run has "
                f"batch_tokens={self.batch_tokens}, max_length={self.max_length}: resume with the "
                "same settings, or start over with --resume=disable"
            )
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])


def eval_batches(samples, batch_size, max_length, block_size, mask_token_id, layout="split", rank=0,
                 world_size=1, pad_multiple=None, pad_id=0):
    """Every sample once, in order, block_offset 0, sharded over ranks; every rank gets the same
    number of micro-batches (padding-only ones where it runs out), so collective forwards (FSDP)
    never hang.
    """
    samples = as_store(samples)
    chunks = [
        range(i, min(i + batch_size, len(samples))) for i in range(0, len(samples), batch_size)
    ]
    per_rank = -(-len(chunks) // world_size)
    for k in range(per_rank):
        j = k * world_size + rank
        part = chunks[j] if j < len(chunks) else []
        yield collate(
            [build_example(*samples[i], block_size, mask_token_id, layout, 0) for i in part],
            max_length,
            pad_multiple,
            pad_id,
        )


# -------------------------------------------------------------------------------------------------
# metrics

def block_metrics(pred, batch, block_size):
    """Counts for per-offset accuracy and tpf_tf, as one float tensor to all-reduce:
    [correct@0..B-1, total@0..B-1, accepted, blocks]. acc@k = correct/total; tpf_tf =
    accepted/blocks, where a block accepts 1 + the length of the correct prefix of its mask
    predictions (what lossless decoding would reach under teacher forcing). pred: argmax ids shaped
    like batch['labels']."""
    B = block_size
    offset, labels = batch["offset"].flatten(), batch["labels"].flatten()
    ok = (pred.flatten() == labels) & (offset >= 0)
    counts = torch.zeros(2 * B + 2, dtype=torch.float64)
    counts[:B] = torch.bincount(offset[ok], minlength=B)[:B].double()
    counts[B:2 * B] = torch.bincount(offset[offset >= 0], minlength=B)[:B].double()
    # masks of one group sit together, in offset order 1, 2, ...: a mask counts when no mask before
    # it in its group (itself included) is wrong
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
    out = {
        f"acc@{k}": (counts[k] / counts[B + k]).item() if counts[B + k] else float("nan")
        for k in range(B)
    }
    out["tpf_tf"] = (
        (counts[2 * B] / counts[2 * B + 1]).item() if counts[2 * B + 1] else float("nan")
    )
    return out


# -------------------------------------------------------------------------------------------------
# the demo data set

def demo_problem(rng):
    """Add two 3-digit numbers column by column, as taught in school: one line per column, named
    u(nits), t(ens), h(undreds), each `digit+digit+carry=two-digit sum`, then the answer."""
    a, b = rng.randint(100, 999), rng.randint(100, 999)
    steps, carry, answer = [], 0, ""
    for column, da, db in zip("uth", str(a)[::-1], str(b)[::-1]):
        total = int(da) + int(db) + carry
        steps.append(f"{column}:{da}+{db}+{carry}={total:02d}")
        answer, carry = str(total % 10) + answer, total // 10
    answer = (str(carry) if carry else "") + answer
    return (
        f"What is {a}+{b}?",
        "<think>\n" + "\n".join(steps) + "\n</think>\nThe answer is " + answer + ".",
    )


def write_demo_data(out_dir, n_train=3600, n_test=200, seed=0):
    """Write train.parquet and test.parquet (chat-list prompt/target columns, as the seed's format)
    into out_dir, deterministically; test problems never occur in train. Skips files that already
    exist.
    """
    paths = {split: os.path.join(out_dir, f"{split}.parquet") for split in ("train", "test")}
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    os.makedirs(out_dir, exist_ok=True)
    rng, seen = random.Random(seed), set()
    rows = {"test": [], "train": []}
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


# -------------------------------------------------------------------------------------------------
# python data.py config/x.py [--key=value ...]: build the stores train.py will use, ahead of a
# (multi-node) launch
if __name__ == "__main__":
    from configurator import configure, script_defaults
    from model import training_tokenizer
    settings = script_defaults(os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py"))
    config = configure(settings)  # train.py's keys: the same config files and overrides work here
    tokenizer, _, _ = training_tokenizer(config["init_from"])
    conversation = chat.Chat(tokenizer, config["chat_template_kwargs"], config["prompt_format"],
                             config["special_text"])
    keys = tuple(config[k] for k in ("prompt_key", "response_key", "messages_key", "tools_key"))
    cache = os.path.expanduser(config["data_cache"])
    for name in ("train_files", "val_files"):
        if config[name]:
            store, key, built = load_store(
                config[name], conversation, cache, keys, config["data_workers"]
            )
            found = f"built in {built:.1f} s" if built is not None else "already built"
            print(
                f"{name}: {len(store)} samples, {store.info['tokens']:,} tokens, {found}: "
                f"{cache}/{key}"
            )
