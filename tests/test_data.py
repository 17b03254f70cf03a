import random

import numpy as np
from pathlib import Path

import pytest
import torch

import chat
from conftest import example, write_parquet
from configurator import UserError
from data import Batches, collate, eval_batches, too_long, truncate
from demo import write_demo_data
from model import block_metrics, summarize_metrics
from store import Store

# ---------------- build_example, truncation, packing

def test_build_example_rejects_bad_arguments():
    with pytest.raises(UserError, match="block_offset must be an int in \\[0, 3\\]"):
        example([1], [2, 3], 4, 9, block_offset=4)
    with pytest.raises(UserError, match="layout=.zigzag.: expected one of .split., .interleaved."):
        example([1], [2, 3], 4, 9, layout="zigzag")
    with pytest.raises(UserError, match="block_size must be"):
        example([1], [2, 3], 0, 9)


def test_block_size_one_is_plain_sft():
    ex = example([1, 2], [3, 4, 5], 1, 9)
    assert ex["input_ids"].tolist() == [1, 2, 3, 4, 5] and ex["labels"].tolist() == [
        -100,
        3,
        4,
        5,
        -100]
    assert not ex["is_mask"].any()


@pytest.mark.parametrize("layout", ["split", "interleaved"])
@pytest.mark.parametrize("offset", [0, 1, 2, 3])
def test_truncation_equals_building_the_shorter_response(layout, offset):
    prompt, response = list(range(1, 6)), list(range(10, 23))
    full = example(prompt, response, 4, 99, layout, offset)
    for max_length in range(6, len(full["input_ids"]) + 1):
        cut = truncate(full, max_length)
        assert len(cut["input_ids"]) <= max_length
        keep = int((cut["position_ids"][~cut["is_mask"]] >= len(prompt)).sum())
        ref = example(prompt, response[:keep], 4, 99, layout, offset)
        for key in ref:
            assert torch.equal(cut[key], ref[key]), (max_length, key)
        if max_length < len(full["input_ids"]):  # and it is the longest that fits
            assert (
                len(example(prompt, response[: keep + 1], 4, 99, layout, offset)["input_ids"])
                > max_length)
    assert truncate(full, 5) is None  # the prompt alone fills the row


def test_truncating_a_conversation_equals_building_the_shorter_one():
    """Several learned turns: cutting to a row's length keeps a prefix of the conversation, exactly
    as if it had been built from that prefix (the later turns clipped or gone); the first turn's
    prompt is never cut.
    """
    from data import build_example
    rng = random.Random(3)
    for _ in range(60):
        B, layout = rng.randint(1, 5), rng.choice(["split", "interleaved"])
        spans, at = [], rng.randint(2, 6)
        for _ in range(rng.randint(1, 3)):
            n = rng.randint(1, 8)
            spans.append((at, at + n))
            at += n + rng.randint(1, 3)
        ids, offsets = [rng.randint(1, 90) for _ in range(spans[-1][1])], [
            rng.randrange(B) for _ in spans]
        full = build_example(ids, spans, B, 99, layout, offsets)
        for max_length in range(spans[0][0], len(full["input_ids"]) + 1):
            cut = truncate(full, max_length)
            if cut is None:
                assert max_length <= spans[0][0] + 1
                continue
            keep = int((~cut["is_mask"]).sum())
            kept = [(s, min(e, keep)) for s, e in spans if s < keep]
            ref = build_example(ids[:keep], kept, B, 99, layout, offsets[:len(kept)])
            for key in ref:
                assert torch.equal(cut[key], ref[key]), (max_length, key)


def test_collate_packs_documents():
    exs = [example([1, 2, 3], [4, 5, 6, 7, 8], 4, 99), example([1, 2], [4, 5], 2, 99),
           example([7] * 8, [5] * 20, 4, 99)]
    b = collate(exs, max_length=32)
    lens = [len(e["input_ids"]) for e in exs]
    assert lens == [11, 5, 43]  # the last is cut to fit a row of its own
    assert b["input_ids"].shape == (2, 32) and b["truncated"] == 1 and b["dropped"] == 0
    assert b["doc_ids"][0].tolist() == [0] * lens[0] + [1] * lens[1] + [-1] * (
        32 - lens[0] - lens[1])
    # positions restart per document
    assert b["position_ids"][0, lens[0] : lens[0] + 2].tolist() == [0, 1,]
    pad = b["doc_ids"] == -1
    assert (b["labels"][pad] == -100).all() and not b["is_mask"][pad].any()
    assert not pad[:, :-1][~pad[:, 1:]].any()  # padding only at the end of a row
    b = collate(exs[:2], max_length=64, pad_multiple=8)
    assert b["input_ids"].shape == (1, 16)  # 11 + 5 tokens, a multiple of 8


def test_collate_drops_prompt_that_does_not_fit():
    b = collate([example([1] * 40, [2, 3], 2, 99), example([1], [2, 3], 2, 99)], max_length=16)
    assert b["dropped"] == 1 and b["input_ids"].shape[0] == 1
    empty = collate([], max_length=16, pad_multiple=8)
    assert empty["input_ids"].shape == (1, 8) and (empty["labels"] == -100).all()


def test_too_long_counts_from_stored_lengths():
    pairs = [([1] * 10, [2] * 4), ([1] * 3, [2] * 8), ([1] * 2, [2])]
    keep, dropped, truncated = too_long(
        [(p + r, [(len(p), len(p) + len(r))]) for p, r in pairs], 10, 4)
    assert (keep.tolist(), dropped, truncated) == ([1, 2], 1, 1)  # 3 + 8 + 6 masks > 10


# ---------------- the iterator

def _samples(n, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        P, n_r = rng.randint(1, 5), rng.randint(1, 9)
        out.append(([rng.randint(1, 50) for _ in range(P + n_r)], [(P, P + n_r)]))
    return out


def _docs(micro):
    """The samples of a list of micro-batches, as (prompt+response) tuples in order."""
    out = []
    for b in micro:
        for row in range(b["input_ids"].shape[0]):
            for doc in b["doc_ids"][row].unique().tolist():
                if doc >= 0:
                    sel = (b["doc_ids"][row] == doc) & ~b["is_mask"][row]
                    out.append(tuple(b["input_ids"][row][sel].tolist()))
    return out


def test_batches_are_sharded_deterministic_and_resumable():
    samples = _samples(50)
    one = Batches(samples, 2, 3, 64, 4, 99, seed=3)
    assert one.steps_per_epoch == 8
    steps = [one.next() for _ in range(20)]  # crosses two epoch boundaries
    same_seed = Batches(samples, 2, 3, 64, 4, 99, seed=3)
    other_seed = Batches(samples, 2, 3, 64, 4, 99, seed=4)
    assert [_docs(s) for s in steps] == [_docs(same_seed.next()) for _ in range(20)]
    assert [_docs(s) for s in steps[:8]] != [_docs(other_seed.next()) for _ in range(8)]
    epoch0 = sum((_docs(s) for s in steps[:8]), [])  # 8 steps of 6 samples: 48 distinct of the 50
    assert len(epoch0) == 48 and len({tuple(x) for x in epoch0}) == len(set(map(tuple, epoch0)))
    # two ranks with half the micro-steps each see, together, what one rank sees
    samples = _samples(48)
    ref = Batches(samples, 2, 4, 64, 4, 99, seed=1)
    ranks = [Batches(samples, 2, 2, 64, 4, 99, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(9):
        assert _docs(ref.next()) == _docs(ranks[0].next()) + _docs(ranks[1].next())
        assert ref.step_samples == ranks[0].step_samples == ranks[1].step_samples
    # resume: a fresh iterator loaded from a state continues identically
    it = Batches(samples, 2, 2, 64, 4, 99, seed=5)
    for _ in range(7):
        it.next()
    state = it.state_dict()
    expected = [it.next() for _ in range(5)]
    again = Batches(samples, 2, 2, 64, 4, 99, seed=5)
    again.load_state_dict(state)
    for a, b in zip(expected, [again.next() for _ in range(5)]):
        for x, y in zip(a, b):
            assert all(
                torch.equal(x[k], y[k]) for k in ("input_ids", "labels", "position_ids", "limit"))


@pytest.mark.parametrize(
    "batch_size,micro_steps,world", [(3, 1, 1), (1, 2, 2), (2, 3, 1), (5, 2, 1)])
def test_batches_resume_with_another_batch_geometry(batch_size, micro_steps, world):
    """Stopped after 3 steps of 4 samples, resumed with another batch size, accumulation or world
    size: the epoch goes on with the next unseen sample; nothing skipped, nothing repeated."""
    samples = _samples(40)
    it = Batches(samples, 2, 2, 64, 4, 99, seed=7)
    seen = []
    for _ in range(3):
        it.next()
        seen += it.step_samples
    again = Batches(samples, batch_size, micro_steps, 64, 4, 99, seed=7, world_size=world)
    again.load_state_dict(it.state_dict())
    while True:
        again.next()
        if again.epoch > 0:
            break
        seen += again.step_samples
    order = it._epoch_plan(0)[0].tolist()
    assert seen == order[:len(seen)]
    # only the epoch's incomplete last step is skipped
    assert len(samples) - len(seen) < again.global_batch


def test_batches_epochs_reshuffle_and_cover_everything():
    samples = _samples(12)
    it = Batches(samples, 3, 1, 64, 4, 99, seed=0)
    epoch0 = sum((_docs(it.next()) for _ in range(4)), [])
    epoch1 = sum((_docs(it.next()) for _ in range(4)), [])
    assert sorted(epoch0) == sorted(epoch1) == sorted(tuple(ids) for ids, _ in samples)
    assert epoch0 != epoch1 and it.state_dict() == {"epoch": 1, "consumed": 12}


def test_batches_too_few_samples():
    with pytest.raises(UserError, match="fewer than one optimizer step"):
        Batches(_samples(3), 2, 2, 64, 4, 99)


def test_eval_batches_same_count_on_every_rank():
    samples = _samples(5)
    per_rank = [list(eval_batches(samples, 2, 64, 4, 99, rank=r, world_size=2)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 2
    assert sorted(_docs(per_rank[0]) + _docs(per_rank[1])) == sorted(
        tuple(ids) for ids, _ in samples)


# ---------------- metrics

def test_block_metrics_counts_offsets_and_accepted_prefix():
    ex = example([1, 2], [10, 11, 12, 13, 14, 15, 16], 4, 99)  # blocks [10..13] [14..16]
    b = collate([ex], 32)
    pred = b["labels"].clone()
    masks = b["is_mask"][0].nonzero().flatten().tolist()  # offsets 1,2,3 then 1,2
    pred[0, masks[1]] = 0  # first block: offset 2 wrong -> accepts 1 + 1
    pred[0, masks[3]] = 0  # second block: offset 1 wrong -> accepts 1 + 0
    m = summarize_metrics(block_metrics(pred, b, 4), 4)
    assert m["acc@0"] == 1.0 and m["acc@1"] == 0.5 and m["acc@2"] == 0.5 and m["acc@3"] == 1.0
    assert m["tpf_tf"] == pytest.approx((2 + 1) / 2)
    m = summarize_metrics(block_metrics(b["labels"], b, 4), 4)
    assert m["tpf_tf"] == pytest.approx(7 / 2)


# ---------------- the demo data set

def test_demo_data_is_deterministic_and_disjoint(tmp_path):
    a = write_demo_data(str(tmp_path / "a"), n_train=300, n_test=50)
    b = write_demo_data(str(tmp_path / "b"), n_train=300, n_test=50)
    ta, tb = chat.read_rows([a["train"]]), chat.read_rows([b["train"]])
    assert [r[0] for r in ta] == [r[0] for r in tb]
    test = chat.read_rows([a["test"]])
    assert not {r[0][0]["content"] for r in test} & {r[0][0]["content"] for r in ta}
    for messages, _, _, _ in test:
        q, target = messages[0]["content"], messages[1]["content"]
        assert target.startswith("<think>\n") and target.endswith(f"The answer is {eval(q[8:-1])}.")


# ---------------- the store: tokenized once, memory-mapped

def _store(files, tok, cache, **kwargs):
    from store import load_store
    return load_store(files, chat.Chat(tok), str(cache), **kwargs)


def _same(a, b):
    return len(a) == len(b) and all(
        list(a[i][0]) == list(b[i][0]) and a[i][1] == b[i][1] for i in range(len(a)))


def test_store_holds_what_encode_gives(tmp_path):
    """Demo data (prompt/target), and a file of whole conversations: the store's samples are token
    for token what chat.encode gives row by row; a second load finds it instead of building it."""
    from demo import demo_tokenizer
    tok = demo_tokenizer()
    files = write_demo_data(str(tmp_path / "demo"), n_train=40, n_test=4)
    conversations = [
        {
            "messages": [
                {"role": "user", "content": f"{i}+{i}?"},
                {"role": "assistant", "content": "hm"},
                {"role": "user", "content": "so?"},
                {"role": "assistant", "content": str(2 * i)}]}
        for i in range(7)]
    chats = write_parquet(tmp_path / "chats.parquet", conversations)
    for path in (files["train"], chats):
        store, key, built = _store(path, tok, tmp_path / "cache", workers=2)
        reference = [
            chat.Chat(tok).encode(m, first, tools)[:2]
            for m, first, tools, _ in chat.read_rows([path])]
        assert built is not None and _same(store, Store.from_samples(reference))
        again, key2, built2 = _store(path, tok, tmp_path / "cache")
        assert key2 == key and built2 is None and _same(again, store)
        assert isinstance(again.ids, np.memmap) and again.where(3) == f"{path} row 3"
    assert [len(s) for _, s in [store[i] for i in range(7)]] == [
        2
    ] * 7  # both assistant turns learned


def test_store_of_gsm8k_with_the_qwen3_tokenizer(tmp_path):
    from conftest import SHARED_DATA, shared_tokenizer
    tok = shared_tokenizer("qwen3")
    from conftest import jsonl
    rows = []
    for ex in jsonl(f"{SHARED_DATA}/gsm8k/train.jsonl")[:200]:
        work, answer = ex["answer"].split("####")
        rows.append(
            {
                "prompt": ex["question"],
                "target": f"<think>\n{work.strip()}\n</think>\n\n{answer.strip()}."})
    path = write_parquet(tmp_path / "gsm.parquet", rows)
    store, _, _ = _store(path, tok, tmp_path / "cache")
    reference = [
        chat.Chat(tok).encode(m, first, tools)[:2] for m, first, tools, _ in chat.read_rows([path])]
    assert _same(store, Store.from_samples(reference))


def test_one_or_two_builders_make_the_same_store(tmp_path):
    from demo import demo_tokenizer
    files = write_demo_data(str(tmp_path / "demo"), n_train=300, n_test=4)
    a, key_a, _ = _store(files["train"], demo_tokenizer(), tmp_path / "one", workers=1)
    b, key_b, _ = _store(files["train"], demo_tokenizer(), tmp_path / "two", workers=2)
    assert key_a == key_b
    for name in ("ids.bin", "offsets.npy", "spans.npy", "span_offsets.npy", "source.npy"):
        assert (tmp_path / "one" / key_a / name).read_bytes() == (
            tmp_path / "two" / key_b / name
        ).read_bytes()


def test_what_decides_the_tokens_decides_the_key(tmp_path):
    from store import expand_files, store_key
    from demo import demo_tokenizer
    path = write_parquet(tmp_path / "a.parquet", [{"prompt": "hi", "target": "yo"}])
    keys = ["prompt", "target", "messages", "tools"]

    def key(tok=None, options=None, keys=keys, prompt_format=None):
        conversation = chat.Chat(tok or demo_tokenizer(), options, prompt_format)
        return store_key(expand_files(path), conversation, keys, str(tmp_path))

    base = key()
    assert key() == base
    other = demo_tokenizer()
    other.add_tokens(["<|new|>"], special_tokens=True)
    template = demo_tokenizer()
    template.chat_template = template.chat_template.replace("<think>", "<reason>")
    changed = [
        key(tok=other),
        key(tok=template),
        key(options={"enable_thinking": True}),
        key(keys=["q", "target", "messages", "tools"]),
        key(prompt_format="Q: {prompt}\nA: ")]
    write_parquet(tmp_path / "a.parquet", [{"prompt": "hi", "target": "yo!"}])  # the data changed
    changed.append(key())
    assert len(set(changed + [base])) == len(changed) + 1


def test_a_damaged_store_is_rebuilt_never_loaded(tmp_path):
    from demo import demo_tokenizer
    files = write_demo_data(str(tmp_path / "demo"), n_train=50, n_test=4)
    store, key, _ = _store(files["train"], demo_tokenizer(), tmp_path / "cache")
    reference = [(list(store[i][0]), store[i][1]) for i in range(len(store))]
    ids = tmp_path / "cache" / key / "ids.bin"
    ids.write_bytes(ids.read_bytes()[:100])  # truncated
    again, _, built = _store(files["train"], demo_tokenizer(), tmp_path / "cache")
    assert built is not None and _same(again, Store.from_samples(reference))
    (tmp_path / "cache" / key / "meta.json").unlink()  # a build cut short
    assert _store(files["train"], demo_tokenizer(), tmp_path / "cache")[2] is not None


@pytest.mark.parametrize("name", ["ids.bin", "offsets.npy", "spans.npy", "span_offsets.npy",
                                  "source.npy"])
def test_flipped_bytes_in_any_store_file_are_never_trained_on(tmp_path, name, capsys):
    """One flipped byte anywhere (sizes unchanged): the builder sees it (each file's crc32), says
    so in one line and builds the store again, equal to the first."""
    from demo import demo_tokenizer
    files = write_demo_data(str(tmp_path / "demo"), n_train=30, n_test=4)
    store, key, _ = _store(files["train"], demo_tokenizer(), tmp_path / "cache")
    reference = [(list(store[i][0]), store[i][1]) for i in range(len(store))]
    path = tmp_path / "cache" / key / name
    blob = bytearray(path.read_bytes())
    blob[-3] ^= 0x01  # the end: inside the data, past any header
    path.write_bytes(bytes(blob))
    again, _, built = _store(files["train"], demo_tokenizer(), tmp_path / "cache")
    assert built is not None and _same(again, Store.from_samples(reference))
    assert f"is damaged ({name}: contents changed (checksum)): building it again" in \
        capsys.readouterr().out


def test_token_ids_beyond_the_vocabulary_and_bad_offsets_are_refused():
    bad_ids = Store(np.array([1, 2, 999], np.uint32), np.array([0, 3]), np.array([[1, 3]]),
                    np.array([0, 1]))
    with pytest.raises(ValueError, match="token id 999, not below the tokenizer's 128"):
        bad_ids.check(128)
    backwards = Store(np.array([1, 2, 3], np.uint32), np.array([0, 3, 2]), np.array([[1, 3],
                      [1, 2]]), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="offsets.npy does not describe ids.bin"):
        backwards.check()
    outside = Store(np.array([1, 2, 3], np.uint32), np.array([0, 3]), np.array([[1, 9]]),
                    np.array([0, 1]))
    with pytest.raises(ValueError, match="a span outside its sample"):
        outside.check()


def test_a_killed_build_is_swept_and_an_edit_in_place_is_seen(tmp_path):
    """A half-built store of a dead process is removed at the next load. A data file edited in
    place with its size and modification time put back is still seen (the checksum cache also keys
    on ctime, which cannot be set back): a new store, and a resume would be refused."""
    import os
    import socket
    import subprocess
    from demo import demo_tokenizer
    files = write_demo_data(str(tmp_path / "demo"), n_train=30, n_test=4)
    _, key, _ = _store(files["train"], demo_tokenizer(), tmp_path / "cache")
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid names a process that is gone
    stale = tmp_path / "cache" / f"{key}.tmp-{socket.gethostname()}-{dead.pid}"
    stale.mkdir()
    (stale / "ids.bin").write_bytes(b"x" * 1000)
    path = files["train"]
    st = os.stat(path)
    blob = bytearray(Path(path).read_bytes())
    i = blob.index(b"What is ")
    blob[i:i + 8] = b"WHAT IS "  # same size
    Path(path).write_bytes(bytes(blob))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns
    _, new_key, built = _store(path, demo_tokenizer(), tmp_path / "cache")
    assert new_key != key and built is not None
    assert not stale.exists()


def test_rows_the_template_refuses_are_counted_and_listed(tmp_path):
    from conftest import byte_tokenizer
    rows = [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    ] * 3 + [
        {
            "messages": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"}]}
    ] * 4
    path = write_parquet(tmp_path / "g.parquet", rows)
    with pytest.raises(UserError) as e:
        _store(path, byte_tokenizer("gemma-2"), tmp_path / "cache")
    message = str(e.value)
    assert (
        message.startswith("4 of 7 rows cannot be rendered by the chat template (")
        and "\n" not in message)
    assert (
        f"{path} row 3: System role not supported; {path} row 4: System role not supported"
        in message)
    # nothing half-written is left
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]


def test_a_cache_folder_that_cannot_be_written(tmp_path):
    from demo import demo_tokenizer
    files = write_demo_data(str(tmp_path / "demo"), n_train=8, n_test=4)
    (tmp_path / "file").write_text("")
    with pytest.raises(
        UserError, match="data_cache .*file/cache' cannot be created: Not a directory"):
        _store(files["train"], demo_tokenizer(), tmp_path / "file" / "cache")


# ---------------- micro-batches of a token budget

def reasoning_lengths(n, seed=0):
    """Sample lengths like real R1 traces: log-uniform from 100 to 16k tokens."""
    rng = np.random.default_rng(seed)
    return np.exp(rng.uniform(np.log(100), np.log(16000), n)).astype(int)


def test_token_budget_rows_are_full_and_steps_cost_the_same():
    lengths = reasoning_lengths(3000)
    samples = Store.from_samples([(np.arange(n) % 50 + 1, [(min(50, n // 3), n)]) for n in lengths])
    it = Batches(samples, 0, 1, 32768, 4, 99, batch_tokens=65536, seed=3)
    assert (it.rows, it.row_length) == (2, 32768)
    plan = it._plan(0)
    real = [sum(min(n, 32768) for row in mb for n in it_lengths(it, row)) for mb in plan]
    assert it.padding() <= 0.05 and max(real) / min(real) <= 1.3, (
        it.padding(),
        max(real) / min(real))
    covered = [i for mb in plan for row in mb for i in row]
    # the epoch's tail, less than one micro-batch of tokens
    skipped = set(range(len(samples))) - set(covered)
    assert len(covered) == len(set(covered)) and sum(it_lengths(it, skipped)) < 65536
    batch = it.next()[0]
    assert batch["input_ids"].shape == (2, 32768)


def it_lengths(it, row):
    order, offsets = it._epoch_plan(0)
    from data import example_lengths
    lengths = example_lengths(it.samples, it.block_size, offsets)
    return [lengths[i] for i in row]


def test_token_budget_is_sharded_resumable_and_refuses_another_budget():
    samples = Store.from_samples(
        [(np.arange(n) % 50 + 1, [(3, n)]) for n in reasoning_lengths(300, 1) // 50 + 5])
    ref = Batches(samples, 0, 4, 256, 4, 99, batch_tokens=512, seed=1)
    ranks = [
        Batches(samples, 0, 2, 256, 4, 99, batch_tokens=512, seed=1, rank=r, world_size=2)
        for r in range(2)]
    for _ in range(5):
        assert _docs(ref.next()) == _docs(ranks[0].next()) + _docs(ranks[1].next())
    # another accumulation: fine
    again = Batches(samples, 0, 1, 256, 4, 99, batch_tokens=512, seed=1)
    again.load_state_dict(ref.state_dict())
    assert _docs(again.next() + again.next() + again.next() + again.next()) == _docs(ref.next())
    other = Batches(samples, 0, 4, 256, 4, 99, batch_tokens=1024, seed=1)
    with pytest.raises(
        UserError,
        match="counts micro-batches of batch_tokens=512, max_length=256; this run has "
        "batch_tokens=1024"):
        other.load_state_dict(ref.state_dict())
    with pytest.raises(UserError, match="counts micro-batches .* this run has batch_tokens=0"):
        Batches(samples, 4, 1, 256, 4, 99, seed=1).load_state_dict(ref.state_dict())


def test_token_budget_smaller_than_a_prompt_names_the_sample(tmp_path):
    samples = Store.from_samples([([1] * 10, [(5, 10)]), ([1] * 90, [(80, 90)])])
    message = "sample 1: its prompt alone has 80 tokens, not fewer than batch_tokens=64"
    with pytest.raises(UserError, match=message):
        Batches(samples, 0, 1, 256, 4, 99, batch_tokens=64)
