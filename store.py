"""
store.py: the data files, tokenized once into a memory-mapped store (docs/design.md, "The data
path").

  expand_files   a path, a glob, a save_to_disk folder or a list of them -> the files (formats.py)
  Store          encoded samples as flat arrays (token ids, offsets, learned spans), memory-mapped
  load_store     the store of some files: found in the cache by a key over everything that decides
                 the tokens and verified, or built once (worker processes, the tokenizer's batched
                 call) by local rank 0 of each node

A store on disk is data only (raw uint32 ids, .npy arrays read without pickle, JSON); each file's
size and crc32 are recorded when it is built and checked by the building rank before a run trains
on it.
"""

import hashlib
import inspect
import json
import multiprocessing
import os
import shutil
import socket
import time
from collections import Counter, deque
from typing import NamedTuple

import numpy as np

import chat
import formats
from common import Progress, file_crc32
from configurator import UserError, first_line
from formats import expand_files

FILES = ("ids.bin", "offsets.npy", "spans.npy", "span_offsets.npy", "source.npy")
ARRAYS = {"offsets.npy": 1, "spans.npy": 2, "span_offsets.npy": 1, "source.npy": 2}  # name: width
VERSION = 2  # of the store's format: part of the key


class Store:
    """Encoded samples: token ids (uint32, one flat array; memory-mapped when read from disk, so
    that the OS keeps one copy for every rank of a node) and each sample's supervised spans ([start,
    end) within the sample). Sample i is ids[starts[i]:ends[i]] with its spans
    spans[span_starts[i]:span_ends[i]]; store[i] -> (ids, spans)."""

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
    def open(cls, folder, vocab_size=None, verify=False):
        """The store in folder, memory-mapped, its structure checked (sizes, offsets, spans).
        verify=True also checks every file's crc32 and that every id is below vocab_size (a read of
        the whole store). ValueError says what is wrong."""
        with open(os.path.join(folder, "meta.json")) as f:
            info = json.load(f)
        for name in FILES:
            size = os.path.getsize(os.path.join(folder, name))
            if size != info["sizes"][name]:
                raise ValueError(f"{name} is {size} bytes, not {info['sizes'][name]}")
            if verify and file_crc32(os.path.join(folder, name)) != info["crc32"][name]:
                raise ValueError(f"{name}: contents changed (checksum)")
        path = os.path.join(folder, "ids.bin")
        ids = (np.memmap(path, dtype=np.uint32, mode="r") if info["tokens"]
               else np.zeros(0, np.uint32))
        arrays = [np.load(os.path.join(folder, name), allow_pickle=False) for name in FILES[1:]]
        store = cls(ids, *arrays, info=info)
        store.check(vocab_size if verify else None)
        return store

    def check(self, vocab_size=None):
        """ValueError unless offsets and spans describe the ids (and, given vocab_size, every id is
        a token of the vocabulary)."""
        offsets = np.append(self.starts[:1], self.ends)
        span_offsets = np.append(self.span_starts[:1], self.span_ends)
        if len(offsets) and (offsets[0] != 0 or offsets[-1] != len(self.ids)
                             or (np.diff(offsets) < 0).any()):
            raise ValueError("offsets.npy does not describe ids.bin")
        if len(span_offsets) and (span_offsets[0] != 0 or span_offsets[-1] != len(self.spans)
                                  or (np.diff(span_offsets) <= 0).any()):
            raise ValueError("span_offsets.npy does not describe spans.npy")
        if len(self):
            lengths, owner = self.span_lengths()
            spans = self.spans
            if (spans[:, 0] < 0).any() or (lengths <= 0).any() or \
                    (spans[:, 1] > self.clean_lengths()[owner]).any():
                raise ValueError("spans.npy holds a span outside its sample")
        if vocab_size is not None and len(self.ids) and int(self.ids.max()) >= vocab_size:
            raise ValueError(f"ids.bin holds token id {int(self.ids.max())}, not below the "
                             f"tokenizer's {vocab_size}")

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
        """"file row N" ("file line N" for JSON lines) of sample i, or "sample i" for a store made
        in memory."""
        if self.source is None or not self.info.get("files"):
            return f"sample {i}"
        file, row = self.source[i]
        unit = self.info.get("units", ["row"] * len(self.info["files"]))[file]
        return f"{self.info['files'][file]} {unit} {row}"

    # the lengths the layout and the token budget need, without reading a token
    def clean_lengths(self):
        return self.ends - self.starts

    def span_lengths(self):
        """(the length of every span, sample by sample, and the sample each belongs to)."""
        counts = self.span_ends - self.span_starts
        first = self.span_starts - np.concatenate([[0], np.cumsum(counts)[:-1]])
        spans = self.spans[np.repeat(first, counts) + np.arange(counts.sum())]
        return spans[:, 1] - spans[:, 0], np.repeat(np.arange(len(self)), counts)

    def first_span_start(self):
        return self.spans[self.span_starts, 0]


def as_store(samples):
    return samples if isinstance(samples, Store) else Store.from_samples(samples)


# -------------------------------------------------------------------------------------------------
# the key: everything that decides the tokens

def tokenizer_fingerprint(tokenizer):
    """What decides how this tokenizer turns text into ids: its vocabulary, merges, added and
    special tokens (the fast tokenizer's full definition), and its chat template."""
    backend = (tokenizer.backend_tokenizer.to_str() if hasattr(tokenizer, "backend_tokenizer")
               else repr(tokenizer))
    special = {k: str(getattr(tokenizer, k, None))
               for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    text = backend + str(tokenizer.chat_template) + json.dumps(special)
    return hashlib.sha256(text.encode()).hexdigest()


def file_checksum(path, cache):
    """crc32 of a file's bytes, remembered in cache by (size, mtime, ctime, inode): an unchanged
    file is read once. ctime cannot be set back by hand, so an edit in place that restores size and
    mtime is still seen (docs/design.md, "The data path")."""
    st = os.stat(path)
    stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    hit = cache.get(os.path.abspath(path))
    if hit and hit[:4] == stamp:
        return hit[4]
    crc = file_crc32(path)
    cache[os.path.abspath(path)] = stamp + [crc]
    return crc


def store_key(paths, conversation, keys, cache_dir):
    """A hash of everything that decides the tokens: the data files' contents, the tokenizer and its
    chat template, the template options and prompt_format, the column keys and data_format, and
    the rules themselves (chat.py's and formats.py's source)."""
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
    rules = inspect.getsource(chat) + inspect.getsource(formats)  # how rows become tokens
    what = {"files": files, "tokenizer": tokenizer_fingerprint(conversation.tok),
            "options": conversation.options, "prompt_format": conversation.prompt_format,
            "special_text": conversation.special_text, "keys": keys,
            "rules": hashlib.sha256(rules.encode()).hexdigest(), "version": VERSION}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:20]


# -------------------------------------------------------------------------------------------------
# building a store

_WORKER = {}


class Encoded(NamedTuple):
    """A worker's share (one chunk of a file), as flat arrays and counts."""
    file: int  # the file's index in the store's files
    layout: str  # the chunk's layout (formats.Chunk): JSON lines are numbered by line
    ids: np.ndarray  # every sample's token ids, concatenated
    lengths: list  # each sample's length
    spans: list  # every learned span, sample by sample
    counts: list  # each sample's number of spans
    notes: list  # (note, where) of every row's notes
    errors: list  # (where, message) of rows the template refused
    rows: int  # the rows read (the malformed ones included)
    bad: list  # the error line of each malformed row skipped (skip_bad_rows)
    source: list  # (file, row) of each sample


def _encode_chunk(chunk):
    """A worker's share: a formats.Chunk -> Encoded."""
    conversation, spec, skip = _WORKER["chat"], _WORKER["spec"], _WORKER["skip"]
    read = formats.rows_of_chunk(chunk, spec, skip)
    results = conversation.encode_many([(r.messages, r.first, r.tools) for r in read.rows])
    file = _WORKER["paths"].index(chunk.path)
    ids, lengths, spans, counts, notes, errors, source = [], [], [], [], [], [], []
    for row, number, result in zip(read.rows, read.numbers, results):
        if isinstance(result, chat.TemplateError):
            errors.append((row.where, str(result)))
            continue
        sample_ids, sample_spans, row_notes = result
        notes += [(note, row.where) for note in sorted(row_notes)]
        if sample_ids is None:  # dropped (special_text='drop')
            continue
        ids.append(np.asarray(sample_ids, dtype=np.uint32))
        lengths.append(len(sample_ids))
        spans += sample_spans
        counts.append(len(sample_spans))
        source.append((file, number))
    flat = np.concatenate(ids) if ids else np.zeros(0, np.uint32)
    return Encoded(file, chunk.layout, flat, lengths, spans, counts, notes, errors,
                   len(read.rows) + len(read.bad), read.bad, source)


def _tasks(paths, spec, rows_per_task):
    for path in paths:
        yield from formats.chunks(path, rows_per_task, spec)


def _in_order(pool, fn, tasks, window):
    """fn over tasks in the pool's workers, results in order, with at most `window` tasks read
    ahead: Pool.imap reads every task (the whole data set) into its queue at once."""
    pending = deque()
    for task in tasks:
        pending.append(pool.apply_async(fn, (task,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _count_rows(paths):
    counts = [formats.count_rows(p) for p in paths]
    return None if None in counts else sum(counts)


def _no_space(folder, e):
    return UserError(f"cannot write the data store in {os.path.dirname(folder)}: {e.strerror} (the "
                     "data files are untouched; free the space or set data_cache)")


def _raw_to_npy(tmp):
    """The per-sample arrays build_store streamed to tmp/*.raw, as .npy: one at a time in memory."""
    for name, width in ARRAYS.items():
        raw = os.path.join(tmp, name + ".raw")
        values = np.fromfile(raw, np.int64) if os.path.getsize(raw) else np.zeros(0, np.int64)
        np.save(os.path.join(tmp, name), values.reshape((-1, width) if width > 1 else -1))
        os.remove(raw)


def build_store(folder, paths, conversation, spec, workers, skip_bad_rows=False, rows_per_task=256):
    """Encode every row of the files into a store in folder (written as folder.tmp-HOST-PID, renamed
    when complete). Files are read as they stream (formats.chunks); rows go to worker processes in
    chunks of rows_per_task, a few chunks ahead; each tokenizes its rows in one batched call.
    Returns the store's info, or raises UserError: the first malformed row (unless
    skip_bad_rows: those are counted), or the rows the template refused."""
    t0 = time.time()
    tmp = f"{folder}.tmp-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    # per-sample arrays stream to files: in memory they would grow past a large data file's size
    columns = {name: open(os.path.join(tmp, name + ".raw"), "wb") for name in ARRAYS}
    for name in ("offsets.npy", "span_offsets.npy"):
        columns[name].write(np.zeros(1, np.int64).tobytes())
    tokens, n_spans, samples, errors, notes, first_where, bad = 0, 0, 0, [], Counter(), {}, []
    file_rows, units, n_bad = [0] * len(paths), ["row"] * len(paths), 0
    _WORKER.update(chat=conversation, spec=spec, skip=skip_bad_rows, paths=paths)
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    bar = Progress(_count_rows(paths), "tokenizing", "rows")
    try:
        tasks = _tasks(paths, spec, rows_per_task)
        results = (_in_order(pool, _encode_chunk, tasks, 4 * workers) if pool
                   else map(_encode_chunk, tasks))
        with open(os.path.join(tmp, "ids.bin"), "wb") as out:
            for part in results:
                out.write(part.ids.tobytes())
                lengths, counts = (np.asarray(x, np.int64) for x in (part.lengths, part.counts))
                for name, values in (("offsets.npy", tokens + np.cumsum(lengths)),
                                     ("span_offsets.npy", n_spans + np.cumsum(counts)),
                                     ("spans.npy", np.asarray(part.spans, np.int64)),
                                     ("source.npy", np.asarray(part.source, np.int64))):
                    columns[name].write(values.tobytes())
                tokens, n_spans = tokens + int(lengths.sum()), n_spans + int(counts.sum())
                samples += len(lengths)
                for note, where in part.notes:
                    notes[note] += 1
                    first_where.setdefault(note, where)
                errors += part.errors
                file_rows[part.file] += part.rows
                units[part.file] = "line" if part.layout == "lines" else "row"
                n_bad += len(part.bad)
                bad += part.bad[:3 - len(bad)]
                bar.update(part.rows, f"{tokens / max(time.time() - t0, 1e-9) / 1e3:.0f}k tokens/s")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _no_space(folder, e) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
        for f in columns.values():
            f.close()
        if pool:
            pool.terminate()
    n_rows = sum(file_rows)
    if errors:
        shutil.rmtree(tmp, ignore_errors=True)
        shown = "; ".join(f"{where}: {message}" for where, message in errors[:3])
        raise UserError(f"{len(errors)} of {n_rows} rows cannot be rendered by the chat template "
                        f"({shown}{'; ...' if len(errors) > 3 else ''}): fix or drop them, or set "
                        "chat_template_kwargs")
    try:
        _raw_to_npy(tmp)
        info = {"samples": samples, "rows": n_rows, "tokens": tokens,
                "files": paths, "file_rows": file_rows, "units": units,
                "bad_rows": n_bad, "bad": bad,
                "notes": {k: [v, first_where[k]] for k, v in notes.items()},
                "build_seconds": time.time() - t0,
                "sizes": {name: os.path.getsize(os.path.join(tmp, name)) for name in FILES},
                "crc32": {name: file_crc32(os.path.join(tmp, name)) for name in FILES}}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(info, f, indent=1)
        os.replace(tmp, folder)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.isdir(folder):  # another process built the same store first
            return Store.open(folder).info
        raise _no_space(folder, e) from None
    return info


def sweep_builds(cache_dir):
    """Remove the half-built stores (<key>.tmp-HOST-PID) that this host's dead processes left."""
    host = socket.gethostname()
    for name in os.listdir(cache_dir):
        key, _, owner = name.partition(".tmp-")
        pid = owner.rpartition("-")[2]
        if owner.startswith(f"{host}-") and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(os.path.join(cache_dir, name), ignore_errors=True)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def load_store(files, conversation, cache_dir, keys=("prompt", "target", "messages", "tools"),
               workers=0, require_target=True, builder=True, wait=lambda: None,
               data_format="auto", skip_bad_rows=False):
    """The store of files: opened from cache_dir/<key>/ when it is there and intact, else built
    there (by the process with builder=True: local rank 0 of each node; the others call wait(), then
    open it). The builder verifies a store it finds (checksums, token ids below the vocabulary) and
    rebuilds a damaged one. keys: (prompt_key, response_key, messages_key, tools_key). A store
    whose files hold no row, or (without skip_bad_rows) one built skipping malformed rows, is one
    error line. Returns (store, key, built: the seconds it took, or None if found)."""
    paths = expand_files(files)
    spec = formats.Spec(*keys, data_format, require_target)
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"data_cache {cache_dir!r} cannot be created: {e.strerror}") from None
    if builder and not os.access(cache_dir, os.W_OK):
        raise UserError(f"data_cache {cache_dir!r} is not writable: set data_cache to a folder you "
                        "can write")
    key = store_key(paths, conversation, list(keys) + [data_format], cache_dir)
    folder, built, vocab = os.path.join(cache_dir, key), None, len(conversation.tok)
    if builder:
        sweep_builds(cache_dir)
        try:
            Store.open(folder, vocab, verify=True)
        except FileNotFoundError:
            built = True
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"data store {folder} is damaged ({first_line(e)}): building it again",
                  flush=True)
            built = True
        if built:
            shutil.rmtree(folder, ignore_errors=True)
            workers = workers or len(os.sched_getaffinity(0))
            built = build_store(folder, paths, conversation, spec, workers,
                                skip_bad_rows)["build_seconds"]
    wait()
    try:
        store = Store.open(folder)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"the data store {folder} cannot be read ({first_line(e)}): delete it and "
                        "start again") from None
    if store.info.get("bad_rows") and not skip_bad_rows:  # built by a run that skipped them
        raise UserError(store.info["bad"][0])
    if not store.info.get("rows"):
        raise UserError(f"{paths[0]} has no rows" if len(paths) == 1 else
                        f"none of the {len(paths)} data files has a row ({', '.join(paths[:3])}"
                        f"{', ...' if len(paths) > 3 else ''})")
    return store, key, built
