import random

import pytest
import torch

from conftest import shared_tokenizer, write_parquet
from configurator import UserError
from data import (Batches, block_metrics, build_example, collate, drop_too_long, encode, encode_samples,
                  end_of_turn_id, eval_batches, load_samples, stop_ids, summarize_metrics, truncate,
                  write_demo_data)
from model import demo_tokenizer

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
USER = [{"role": "user", "content": "What is 2+2?"}]


# ---------------------------------------------------------------- reading parquet and bad input

def test_load_strings_and_chat_lists(tmp_path):
    a = write_parquet(tmp_path / "a.parquet", [{"prompt": "hi", "target": "yo"}])
    write_parquet(tmp_path / "b.parquet", [{"prompt": USER, "target": [{"role": "assistant", "content": "4"}]}])
    samples = load_samples(str(tmp_path / "*.parquet"))
    assert [s[:2] for s in samples] == [([{"role": "user", "content": "hi"}], "yo"), (USER, "4")]
    assert samples[0][2] == f"{a} row 0"
    assert len(load_samples([a, a])) == 2


def test_custom_keys(tmp_path):
    path = write_parquet(tmp_path / "a.parquet", [{"instruction": "hi", "output": "yo"}])
    assert load_samples(path, "instruction", "output")[0][1] == "yo"


@pytest.mark.parametrize("row,message", [
    ({"question": "hi", "target": "yo"}, "missing column 'prompt'"),
    ({"prompt": "  ", "target": "yo"}, "row 1: column 'prompt' message 0 has empty content"),
    ({"prompt": "hi", "target": ""}, "row 1: column 'target' is empty"),
    ({"prompt": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}], "target": "yo"},
     "row 1: column 'prompt' message 1 has unknown role 'robot'"),
    ({"prompt": "hi", "target": [{"role": "user", "content": "x"}]}, "row 1: column 'target' has no assistant"),
    ({"prompt": None, "target": "yo"}, "row 1: column 'prompt' must be a string or a list .* got NoneType"),
    ({"prompt": [], "target": "yo"}, "row 1: column 'prompt' must be .* got an empty list"),
])
def test_bad_rows_name_file_row_and_problem(tmp_path, row, message):
    # a parquet column holds one type: the good first row is of the same kind as the bad one
    good = {k: USER if isinstance(v, list) and k == "prompt" else
            [{"role": "assistant", "content": "ok"}] if isinstance(v, list) else "ok" for k, v in row.items()}
    rows = [row, row] if "question" in row else [good, row]
    path = write_parquet(tmp_path / "bad.parquet", rows)
    with pytest.raises(UserError, match=message) as e:
        load_samples(path)
    assert "bad.parquet" in str(e.value) and "\n" not in str(e.value)


def test_non_string_content(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    msgs = pa.array([[{"role": "user", "content": 3}]], pa.list_(pa.struct([("role", pa.string()),
                                                                            ("content", pa.int64())])))
    pq.write_table(pa.table({"prompt": msgs, "target": ["x"]}), tmp_path / "n.parquet")
    with pytest.raises(UserError, match="row 0: column 'prompt' message 0 content must be a string, got int"):
        load_samples(str(tmp_path / "n.parquet"))


def test_corrupt_and_missing_files(tmp_path):
    (tmp_path / "junk.parquet").write_bytes(b"this is not parquet at all")
    with pytest.raises(UserError, match="junk.parquet: cannot read parquet"):
        load_samples(str(tmp_path / "junk.parquet"))
    with pytest.raises(UserError, match="not found"):
        load_samples(str(tmp_path / "absent.parquet"))
    with pytest.raises(UserError, match="no parquet file matches"):
        load_samples(str(tmp_path / "none*.parquet"))


def test_zero_samples(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "target": pa.array([], pa.string())}),
                   tmp_path / "empty.parquet")
    with pytest.raises(UserError, match="no samples"):
        load_samples(str(tmp_path / "empty.parquet"))


# ---------------------------------------------------------------- encode: chat templates and <think>

def _tok(template):
    """The demo's character tokenizer with ChatML's special tokens and another template."""
    tok = demo_tokenizer()
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.chat_template = template
    return tok


def _decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=False)


def test_chatml_without_think_keeps_target_whole():
    tok = _tok(CHATML)
    for target in ("<think>\nhm</think>The answer is 4.", "The answer is 4."):
        p, r = encode(tok, USER, target)
        assert _decode(tok, p).endswith("<|im_start|>assistant\n")
        assert _decode(tok, r) == target + "<|im_end|>"


def test_think_generation_prompt_overlap_removed():
    tok = demo_tokenizer()  # its generation prompt ends with <think>\n, like the R1 distills
    p, r = encode(tok, "What is 2+2?", "<think>\nLet me add.</think>The answer is 4.")
    assert _decode(tok, p).endswith("<|assistant|>\n<think>\n")
    assert _decode(tok, r) == "Let me add.</think>The answer is 4.<|end|>"
    # only an exact overlap counts: the prompt ends "<think>\n", which "<think>Let" does not start with
    p, r = encode(tok, "What is 2+2?", "<think>Let me add.</think>4")
    assert _decode(tok, r) == "<think>Let me add.</think>4<|end|>"
    p, r = encode(tok, "What is 2+2?", "The answer is 4.")  # no think at all: nothing to remove
    assert _decode(tok, r) == "The answer is 4.<|end|>"


def test_coincidental_plain_text_overlap_is_kept():
    tok = _tok(CHATML)
    _, r = encode(tok, USER, "nt\nHi")  # the prompt ends with "assistant\n": plain text, not an added token
    assert _decode(tok, r) == "nt\nHi<|im_end|>"


def test_prompt_format_without_chat_template():
    tok = _tok(None)
    with pytest.raises(UserError, match="has no chat template: set prompt_format"):
        encode(tok, USER, "4")
    p, r = encode(tok, USER, "4", prompt_format="Q: {prompt}\nA: ")
    assert _decode(tok, p) == "Q: What is 2+2?\nA: " and r[-1] == tok.eos_token_id


def test_stop_ids_are_the_end_of_turn_and_eos():
    tok = demo_tokenizer()
    assert stop_ids(tok) == {tok.convert_tokens_to_ids("<|end|>"), tok.eos_token_id}
    assert stop_ids(tok, prompt_format="Q: {prompt}\nA: ") == {tok.eos_token_id}  # no template turn to close


def test_qwen25_chatml_real_tokenizer():
    tok = shared_tokenizer("qwen2.5-instruct")
    p, r = encode(tok, "What is 2+2?", "<think>\nhm\n</think>\n\nThe answer is 4.")
    assert end_of_turn_id(tok) == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.decode(p).endswith("<|im_start|>assistant\n")
    assert tok.decode(r) == "<think>\nhm\n</think>\n\nThe answer is 4.<|im_end|>"


def test_qwen3_real_tokenizer_with_and_without_think_prompt():
    tok = shared_tokenizer("qwen3")
    target = "<think>\nLet me calculate.\n</think>\n\nThe answer is 4."
    p, r = encode(tok, "What is 2+2?", target)  # Qwen3's generation prompt has no <think>: keep it
    assert tok.decode(r) == target + "<|im_end|>" and r[0] == tok.convert_tokens_to_ids("<think>")
    # an R1-distill style template appends <think>\n to the generation prompt: the overlap goes
    tok.chat_template = tok.chat_template.replace("'<|im_start|>assistant\\n'", "'<|im_start|>assistant\\n<think>\\n'")
    p, r = encode(tok, "What is 2+2?", target)
    assert tok.decode(p).endswith("<|im_start|>assistant\n<think>\n")
    assert tok.decode(r) == "Let me calculate.\n</think>\n\nThe answer is 4.<|im_end|>"


def test_gpt2_without_template():
    tok = shared_tokenizer("gpt2")
    with pytest.raises(UserError, match="no chat template"):
        encode(tok, "hi", "there")
    p, r = encode(tok, "hi", " there", prompt_format="Q: {prompt}\nA:")
    assert r[-1] == tok.eos_token_id and tok.decode(p) == "Q: hi\nA:"


def test_encode_samples_on_gsm8k_style_parquet(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": f"What is {i}+{i}?"}],
             "target": [{"role": "assistant",
                         "content": f"<think>\n{i}+{i}={2 * i}\n</think>\n\nThe answer is {2 * i}."}]}
            for i in range(5)]
    encoded = encode_samples(demo_tokenizer(), load_samples(write_parquet(tmp_path / "t.parquet", rows)))
    assert len(encoded) == 5 and all(r[-1] == demo_tokenizer().convert_tokens_to_ids("<|end|>") for _, r in encoded)


# ---------------------------------------------------------------- build_example, truncation, packing

def test_build_example_rejects_bad_arguments():
    with pytest.raises(UserError, match="block_offset must be an int in \\[0, 3\\]"):
        build_example([1], [2, 3], 4, 9, block_offset=4)
    with pytest.raises(UserError, match="layout must be"):
        build_example([1], [2, 3], 4, 9, layout="zigzag")
    with pytest.raises(UserError, match="block_size must be"):
        build_example([1], [2, 3], 0, 9)


def test_block_size_one_is_plain_sft():
    ex = build_example([1, 2], [3, 4, 5], 1, 9)
    assert ex["input_ids"].tolist() == [1, 2, 3, 4, 5] and ex["labels"].tolist() == [-100, 3, 4, 5, -100]
    assert not ex["is_mask"].any()


@pytest.mark.parametrize("layout", ["split", "interleaved"])
@pytest.mark.parametrize("offset", [0, 1, 2, 3])
def test_truncation_equals_building_the_shorter_response(layout, offset):
    prompt, response = list(range(1, 6)), list(range(10, 23))
    full = build_example(prompt, response, 4, 99, layout, offset)
    for max_length in range(6, len(full["input_ids"]) + 1):
        cut = truncate(full, max_length)
        assert len(cut["input_ids"]) <= max_length
        keep = int((cut["position_ids"][~cut["is_mask"]] >= len(prompt)).sum())
        ref = build_example(prompt, response[:keep], 4, 99, layout, offset)
        for key in ref:
            assert torch.equal(cut[key], ref[key]), (max_length, key)
        if max_length < len(full["input_ids"]):  # and it is the longest that fits
            assert len(build_example(prompt, response[:keep + 1], 4, 99, layout, offset)["input_ids"]) > max_length
    assert truncate(full, 5) is None  # the prompt alone fills the row


def test_collate_packs_documents():
    exs = [build_example([1, 2, 3], [4, 5, 6, 7, 8], 4, 99), build_example([1, 2], [4, 5], 2, 99),
           build_example([7] * 8, [5] * 20, 4, 99)]
    b = collate(exs, max_length=32)
    lens = [len(e["input_ids"]) for e in exs]
    assert lens == [11, 5, 43]  # the last is cut to fit a row of its own
    assert b["input_ids"].shape == (2, 32) and b["truncated"] == 1 and b["dropped"] == 0
    assert b["doc_ids"][0].tolist() == [0] * lens[0] + [1] * lens[1] + [-1] * (32 - lens[0] - lens[1])
    assert b["position_ids"][0, lens[0]:lens[0] + 2].tolist() == [0, 1]  # positions restart per document
    pad = b["doc_ids"] == -1
    assert (b["labels"][pad] == -100).all() and not b["is_mask"][pad].any()
    assert not pad[:, :-1][~pad[:, 1:]].any()  # padding only at the end of a row
    b = collate(exs[:2], max_length=64, pad_multiple=8)
    assert b["input_ids"].shape == (1, 16)  # 11 + 5 tokens, a multiple of 8


def test_collate_drops_prompt_that_does_not_fit():
    b = collate([build_example([1] * 40, [2, 3], 2, 99), build_example([1], [2, 3], 2, 99)], max_length=16)
    assert b["dropped"] == 1 and b["input_ids"].shape[0] == 1
    empty = collate([], max_length=16, pad_multiple=8)
    assert empty["input_ids"].shape == (1, 8) and (empty["labels"] == -100).all()


def test_drop_too_long_counts():
    kept, dropped, truncated = drop_too_long([([1] * 10, [2] * 4), ([1] * 3, [2] * 8), ([1] * 2, [2])], 10, 4)
    assert (len(kept), dropped, truncated) == (2, 1, 1)  # 3 + 8 + 6 masks > 10


# ---------------------------------------------------------------- the iterator

def _samples(n, seed=0):
    rng = random.Random(seed)
    return [([rng.randint(1, 50) for _ in range(rng.randint(1, 5))],
             [rng.randint(1, 50) for _ in range(rng.randint(1, 9))]) for _ in range(n)]


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
    two = [Batches(samples, 2, 3 // 1, 64, 4, 99, seed=3, rank=r, world_size=1) for r in range(1)]
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(steps[0], two[0].next()))
    # two ranks with half the micro-steps each see, together, what one rank sees
    samples = _samples(48)
    ref = Batches(samples, 2, 4, 64, 4, 99, seed=1)
    ranks = [Batches(samples, 2, 2, 64, 4, 99, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(9):
        assert _docs(ref.next()) == _docs(ranks[0].next()) + _docs(ranks[1].next())
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
            assert all(torch.equal(x[k], y[k]) for k in ("input_ids", "labels", "position_ids", "limit"))


def test_batches_epochs_reshuffle_and_cover_everything():
    samples = _samples(12)
    it = Batches(samples, 3, 1, 64, 4, 99, seed=0)
    epoch0 = sum((_docs(it.next()) for _ in range(4)), [])
    epoch1 = sum((_docs(it.next()) for _ in range(4)), [])
    assert sorted(epoch0) == sorted(epoch1) == sorted(tuple(p + r) for p, r in samples)
    assert epoch0 != epoch1 and it.state_dict() == {"epoch": 1, "step": 4}


def test_batches_too_few_samples():
    with pytest.raises(UserError, match="fewer than one optimizer step"):
        Batches(_samples(3), 2, 2, 64, 4, 99)


def test_eval_batches_same_count_on_every_rank():
    samples = _samples(5)
    per_rank = [list(eval_batches(samples, 2, 64, 4, 99, rank=r, world_size=2)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 2
    assert sorted(_docs(per_rank[0]) + _docs(per_rank[1])) == sorted(tuple(p + r) for p, r in samples)


# ---------------------------------------------------------------- metrics

def test_block_metrics_counts_offsets_and_accepted_prefix():
    ex = build_example([1, 2], [10, 11, 12, 13, 14, 15, 16], 4, 99)  # blocks [10..13] [14..16]
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


# ---------------------------------------------------------------- the demo data set

def test_demo_data_is_deterministic_and_disjoint(tmp_path):
    a = write_demo_data(str(tmp_path / "a"), n_train=300, n_test=50)
    b = write_demo_data(str(tmp_path / "b"), n_train=300, n_test=50)
    ta, tb = load_samples(a["train"]), load_samples(b["train"])
    assert [s[:2] for s in ta] == [s[:2] for s in tb]
    test = load_samples(a["test"])
    assert not {s[0][0]["content"] for s in test} & {s[0][0]["content"] for s in ta}
    for messages, target, _ in test:
        q = messages[0]["content"]
        assert target.startswith("<think>\n") and target.endswith(f"The answer is {eval(q[8:-1])}.")
