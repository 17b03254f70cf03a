"""formats.py: the same conversations written in every format and shape people bring (parquet,
JSON lines, JSON, compressed JSON, a `datasets` save_to_disk folder, OpenAI messages, ShareGPT,
sample.py's --write_jsonl) give the same token ids and learned spans row for row, through the store
train.py builds; every malformed row or file is one line naming file, row (or line) and field.
"""

import gzip
import json
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import chat
import formats
from conftest import SHARED_DATA, byte_tokenizer, shared_tokenizer, write_parquet
from configurator import UserError
from demo import demo_tokenizer, write_demo_data
from store import load_store, store_key

SYSTEM = "You add numbers."


# ---------------- writers: one conversation per row, every shape and file format

def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return str(path)


def write_compressed(path, rows, codec):
    with pa.output_stream(str(path), compression=codec) as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows).encode())
    return str(path)


def save_to_disk(folder, rows, shards=2):
    """A folder as `datasets`' save_to_disk writes it, made with pyarrow alone: Arrow IPC stream
    shards data-0000K-of-0000N.arrow (several record batches each), dataset_info.json, state.json
    naming the shards in order."""
    os.makedirs(folder)
    table = pa.Table.from_pylist(rows)
    table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": {}}})})
    per, names = -(-len(rows) // shards), []
    for k in range(shards):
        names.append(f"data-{k:05d}-of-{shards:05d}.arrow")
        part = table.slice(k * per, per)
        with pa.ipc.new_stream(os.path.join(folder, names[-1]), part.schema) as writer:
            for batch in part.to_batches(max_chunksize=7):
                writer.write_batch(batch)
    with open(os.path.join(folder, "dataset_info.json"), "w") as f:
        json.dump({"citation": "", "description": "", "features": {}, "homepage": ""}, f)
    with open(os.path.join(folder, "state.json"), "w") as f:
        json.dump({"_data_files": [{"filename": n} for n in names], "_fingerprint": "0",
                   "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
                   "_output_all_columns": False, "_split": None}, f)
    return str(folder)


def sharegpt(messages, system_column=False):
    """A conversation as ShareGPT writes it: from/value turns, tool calls as function_call turns
    (the JSON of {name, arguments}), tool output as observation; the system prompt a turn or, as
    Bespoke-Stratos and OpenThoughts keep it, a column beside the turns."""
    names = {"user": "human", "assistant": "gpt", "system": "system", "tool": "observation"}
    row, turns = {}, []
    for m in messages:
        if m["role"] == "system" and system_column:
            row["system"] = m["content"]
        elif m.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                     for c in m["tool_calls"]]
            turns.append({"from": "function_call", "value": json.dumps(calls[0])})
        else:
            turns.append({"from": names[m["role"]], "value": m["content"]})
    return dict(row, conversations=turns)


def with_parts(messages):
    """OpenAI content parts: each content split at its first newline into two text parts."""
    out = []
    for m in messages:
        if "\n" in m.get("content", ""):
            a, b = m["content"].split("\n", 1)
            m = dict(m, content=[{"type": "text", "text": a}, {"type": "text", "text": b}])
        out.append(m)
    return out


def every_format(folder, conversations, tools=None):
    """{name: the data files} of the conversations, each format and shape."""
    os.makedirs(folder, exist_ok=True)
    rows = [dict({"messages": c}, **({"tools": tools} if tools else {})) for c in conversations]
    as_text = [dict(r, tools=json.dumps(tools)) if tools else r for r in rows]
    first = [1 if c[0]["role"] != "system" else 2 for c in conversations]
    shared = [dict(sharegpt(c, system_column=i % 2 == 0), **({"tools": json.dumps(tools)}
                                                            if tools else {}))
              for i, c in enumerate(conversations)]
    files = {
        "parquet prompt/target": write_parquet(
            f"{folder}/pt.parquet",
            [dict({"prompt": c[:n], "target": c[n:]}, **({"tools": json.dumps(tools)}
                                                      if tools else {}))
             for c, n in zip(conversations, first)]),
        "parquet messages": write_parquet(f"{folder}/m.parquet", as_text),
        "jsonl": write_jsonl(f"{folder}/m.jsonl", rows),
        "jsonl.gz": write_compressed(f"{folder}/m.jsonl.gz", rows, "gzip"),
        "jsonl.zst": write_compressed(f"{folder}/m.jsonl.zst", rows, "zstd"),
        "json array": str(folder / "m.json"),
        "json lines in .json": write_jsonl(f"{folder}/lines.json", rows),
        "save_to_disk": save_to_disk(folder / "saved", as_text),
        "sharegpt jsonl": write_jsonl(f"{folder}/sg.jsonl", shared),
        "sharegpt save_to_disk": save_to_disk(
            folder / "sg_saved", [sharegpt(c) | ({"tools": json.dumps(tools)} if tools else {})
                                  for c in conversations], shards=1),
        "openai content parts": write_jsonl(f"{folder}/parts.jsonl",
                                            [dict(r, messages=with_parts(r["messages"]))
                                             for r in rows]),
        "sample.py --write_jsonl": str(folder / "written.jsonl")}
    with open(files["json array"], "w") as f:
        json.dump(rows, f, indent=2)
    formats.write_rows([{"prompt": c[:n], "target": c[n:], "tools": tools}
                       for c, n in zip(conversations, first)], "", files["sample.py --write_jsonl"])
    return files


def assert_same_everywhere(tmp_path, tok, conversations, tools=None, **options):
    """Every format's store holds, row for row, what chat.encode makes of the conversations
    themselves (no reader involved); the learned spans are not empty."""
    conversation = chat.Chat(tok, **options)
    reference = conversation.encode_many([(c, 0, tools) for c in conversations])
    assert all(spans for _, spans, _ in reference)
    files = every_format(tmp_path / "data", conversations, tools)
    for name, path in files.items():
        store, _, _ = load_store(path, conversation, str(tmp_path / "cache"), workers=2)
        assert len(store) == len(conversations), name
        for i, (ids, spans, _) in enumerate(reference):
            got_ids, got_spans = store[i]
            assert list(got_ids) == ids and got_spans == [list(s) for s in spans], (name, i)
    return files


def demo_conversations(tmp_path, n):
    path = write_demo_data(str(tmp_path / "demo"), n_train=n, n_test=4)["train"]
    rows = pq.read_table(path).to_pylist()
    # every third with a system prompt: ShareGPT's system turn and system column are read
    return [([{"role": "system", "content": SYSTEM}] if i % 3 == 0 else []) + r["prompt"] +
            r["target"] for i, r in enumerate(rows)]


def test_the_demo_data_in_every_format_gives_the_same_tokens(tmp_path):
    files = assert_same_everywhere(tmp_path, demo_tokenizer(), demo_conversations(tmp_path, 60))
    store, _, _ = load_store(files["jsonl"], chat.Chat(demo_tokenizer()), str(tmp_path / "cache"))
    assert store.where(4) == f"{files['jsonl']} line 5"  # JSON lines are named by line
    saved = load_store(files["save_to_disk"], chat.Chat(demo_tokenizer()),
                       str(tmp_path / "cache"))[0]
    assert saved.info["files"] == [f"{files['save_to_disk']}/data-0000{k}-of-00002.arrow"
                                   for k in (0, 1)]


def gsm8k_conversations(n):
    path = os.path.join(SHARED_DATA, "gsm8k", "train.jsonl")
    if not os.path.exists(path):
        pytest.skip(f"{path} not present")
    out = []
    with open(path) as f:
        for line, _ in zip(f, range(n)):
            ex = json.loads(line)
            work, answer = ex["answer"].split("####")
            out.append([{"role": "user", "content": ex["question"]},
                        {"role": "assistant", "content": f"<think>\n{work.strip()}\n</think>\n\n"
                                                         f"The answer is {answer.strip()}."}])
    return out


def test_gsm8k_in_every_format_gives_the_same_tokens(tmp_path):
    assert_same_everywhere(tmp_path, shared_tokenizer("qwen3"), gsm8k_conversations(64))


TOOLS = [{"type": "function", "function": {
    "name": "add", "description": "Add two numbers", "parameters": {
        "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
        "required": ["a", "b"]}}}]


def test_tool_conversations_in_every_format_give_the_same_tokens(tmp_path):
    """tool_calls and tool turns (ShareGPT's function_call and observation), several learned
    assistant turns, a tools column, under Qwen3's template."""
    conversations = [[
        {"role": "user", "content": f"What is {i}+{i + 1}?"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"type": "function",
                         "function": {"name": "add", "arguments": {"a": i, "b": i + 1}}}]},
        {"role": "tool", "content": str(2 * i + 1)},
        {"role": "assistant", "content": f"It is\n{2 * i + 1}."}] for i in range(12)]
    files = assert_same_everywhere(tmp_path, byte_tokenizer("qwen3"), conversations, TOOLS)
    (row,) = formats.read_rows([files["sharegpt jsonl"]])[:1]
    assert row.messages[1]["tool_calls"][0]["function"] == {"name": "add",
                                                           "arguments": {"a": 0, "b": 1}}


def encode(tok, messages):
    return chat.Chat(tok).encode(messages, 0)


def test_reasoning_content_is_rendered_as_the_template_renders_reasoning():
    reasoning, answer = "2+2 is 4.\nYes.", "The answer is 4."
    asked = [{"role": "user", "content": "What is 2+2?"}]
    split = asked + [{"role": "assistant", "content": answer, "reasoning_content": reasoning}]
    inline = asked + [{"role": "assistant",
                       "content": f"<think>\n{reasoning}\n</think>\n\n{answer}"}]
    # Qwen3's template takes reasoning_content, and parses <think> out of content the same way
    qwen3 = byte_tokenizer("qwen3")
    ids, spans, notes = encode(qwen3, split)
    assert (ids, spans) == encode(qwen3, inline)[:2] and not notes
    assert qwen3.decode(ids[spans[0][0]:]).startswith(f"<think>\n{reasoning}\n</think>")
    # gpt-oss takes it as `thinking`: its analysis channel
    oss = byte_tokenizer("gpt-oss")
    ids, spans, _ = encode(oss, split)
    thinking = asked + [{"role": "assistant", "content": answer, "thinking": reasoning}]
    assert (ids, spans) == encode(oss, thinking)[:2] and reasoning in oss.decode(ids)
    # a template with no reasoning field: written into the content as Qwen3 writes it, and said
    ids, spans, notes = encode(demo_tokenizer(), split)
    assert (ids, spans) == encode(demo_tokenizer(), inline)[:2]
    assert notes == {"reasoning_in_content"}


def test_the_unknown_token_is_noted():
    answer = {"role": "assistant", "content": "<think>\nhm\n</think>\nok"}
    for text in ("a\x00b", "\u05d0\u05d1", "\U0001f600"):  # NUL, right-to-left, an emoji
        ids, _, notes = encode(demo_tokenizer(), [{"role": "user", "content": text}, answer])
        assert notes == {"unknown_token"} and demo_tokenizer().unk_token_id in ids
    assert not encode(demo_tokenizer(), [{"role": "user", "content": "plain"}, answer])[2]
    # its text typed into a message is text, not the token
    typed = encode(demo_tokenizer(), [{"role": "user", "content": "<|unk|> typed"}, answer])
    assert typed[2] == {"special_text"} and demo_tokenizer().unk_token_id not in typed[0]


# ---------------- one line per malformed row or file

GOOD = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
LINE = json.dumps(GOOD) + "\n"


@pytest.mark.parametrize("name,text,message", [
    ("cut.jsonl", LINE + '{"messages": [{"role": "user", "content": "q"',
     "cut.jsonl line 2: the last line is cut short (Expecting ',' delimiter, column 46): was the "
     "file written completely?"),
    ("bad.jsonl", LINE + LINE + '{"messages": [}\n',
     "bad.jsonl line 3: invalid JSON (Expecting value, column 15)"),
    ("blank.jsonl", "\n" + LINE + "\n" + '"a string"\n',
     "blank.jsonl line 4: expected a JSON object (one row), got a string"),
    ("missing.jsonl", LINE + '{"question": "hi", "answer": "yo"}\n',
     "missing.jsonl line 2: missing key 'prompt' (keys: question, answer; set prompt_key / "
     "response_key, or give a 'messages' or 'conversations' key, or set data_format)"),
    ("role.jsonl", '{"messages": [{"role": "robot", "content": "q"}]}\n',
     "role.jsonl line 1: key 'messages' message 0 has unknown role 'robot' (expected one of "
     "system, user, assistant, tool)"),
    ("sharegpt_role.jsonl", '{"conversations": [{"from": "bot", "value": "q"}]}\n',
     "sharegpt_role.jsonl line 1: key 'conversations' message 0 has unknown role 'bot' "
     "(ShareGPT 'from': expected one of human, gpt, system, function_call, observation)"),
    ("empty.jsonl", '{"messages": []}\n',
     "empty.jsonl line 1: key 'messages' must be a string or a list of {role, content} messages, "
     "got an empty list"),
    ("content.jsonl", '{"messages": [{"role": "user", "content": {"text": "q"}}]}\n',
     "content.jsonl line 1: key 'messages' message 0 content must be a string, got dict"),
    ("value.jsonl", '{"conversations": [{"from": "human", "value": 3}]}\n',
     "value.jsonl line 1: key 'conversations' message 0 value must be a string, got int"),
    ("image.jsonl", '{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}\n',
     "image.jsonl line 1: key 'messages' message 0 content part 0 must be {'type': 'text', "
     "'text': ...}, got 'image_url': only text is read"),
    ("call.jsonl", '{"conversations": [{"from": "human", "value": "q"}, '
                   '{"from": "function_call", "value": "add(1, 2)"}]}\n',
     "call.jsonl line 1: key 'conversations' message 1: a function_call's value must be the JSON "
     'of {"name": ..., "arguments": ...} (or a list of them)'),
    ("reasoning.jsonl", '{"messages": [{"role": "user", "content": "q", '
                        '"reasoning_content": "r"}]}\n',
     "reasoning.jsonl line 1: key 'messages' message 0: reasoning_content must be a string, on an "
     "assistant message (got str on 'user')"),
    ("noassistant.jsonl", '{"messages": [{"role": "user", "content": "q"}]}\n',
     "noassistant.jsonl line 1: key 'messages' has no assistant message to learn"),
    ("cut.json", '[' + json.dumps(GOOD) + ',\n ' + LINE[:30],
     "cut.json row 1 (line 2): the JSON array is cut short (Expecting property name enclosed in "
     "double quotes): was the file written completely?"),
    ("syntax.json", '[' + json.dumps(GOOD) + ',\n {"messages" []}]',
     "syntax.json row 1 (line 2): invalid JSON (Expecting ':' delimiter, line 2)"),
    ("object.json", '{\n  "data": []\n}\n',
     "object.json line 1: invalid JSON (Expecting property name enclosed in double quotes, column "
     "2) (a .json file holds a JSON array of rows, or one row per line)"),
    ("data.csv", "prompt,target\nhi,yo\n",
     "data.csv: not a data file this reads (.parquet, .arrow, .jsonl, .json (JSON also .gz or "
     ".zst); or a folder written by datasets' save_to_disk)"),
    ("x.parquet.gz", "", "x.parquet.gz: only JSON files are read compressed (x.jsonl.gz, "
     "x.json.zst); parquet and arrow files compress inside")])
def test_a_malformed_row_or_file_is_one_line(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(UserError) as e:
        formats.read_rows(formats.expand_files(str(tmp_path / name)))
    assert str(e.value) == f"{tmp_path}/{message}"


def test_a_malformed_parquet_row_names_its_column(tmp_path):
    path = write_parquet(tmp_path / "sg.parquet", [
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]}])
    with pytest.raises(UserError, match=re.escape(
            "sg.parquet row 1: column 'conversations' message 1 has unknown role 'robot'")):
        formats.read_rows([path])
    with pytest.raises(UserError, match=re.escape(
            "sg.parquet: missing column 'prompt' (columns: conversations; set prompt_key")):
        formats.read_rows([path], data_format="prompt_target")
    with pytest.raises(UserError, match=re.escape(
            "sg.parquet row 0: column 'conversations' message 0 must have 'role' and 'content' "
            "(a ShareGPT message? set data_format='sharegpt')")):
        formats.read_rows([path], data_format="messages")


def test_data_format_and_messages_key_choose_the_shape(tmp_path):
    both = {"prompt": "hi", "target": "yo", "chat": [{"role": "user", "content": "q"},
                                                      {"role": "assistant", "content": "a"}]}
    path = write_jsonl(tmp_path / "both.jsonl", [both])
    assert formats.read_rows([path])[0].messages[0]["content"] == "hi"  # no 'messages' column
    (row,) = formats.read_rows([path], messages_key="chat")
    assert row.messages[0]["content"] == "q" and row.first == 0
    (row,) = formats.read_rows([path], messages_key="chat", data_format="prompt_target")
    assert row.messages[0]["content"] == "hi" and row.first == 1
    with pytest.raises(UserError, match="messages_key"):
        formats.read_rows([path], data_format="sharegpt")


def test_skip_bad_rows_skips_counts_and_remembers(tmp_path):
    robot = '{"messages": [{"role": "robot", "content": "q"}]}\n'
    lines = [LINE] * 6 + ['{"messages": [}\n', robot, LINE, '{"messages": [{"role": "user"']
    path = tmp_path / "some_bad.jsonl"
    path.write_text("".join(lines))
    conversation, cache = chat.Chat(demo_tokenizer()), str(tmp_path / "cache")
    with pytest.raises(UserError, match="some_bad.jsonl line 7: invalid JSON"):
        load_store(str(path), conversation, cache, workers=2)
    store, _, _ = load_store(str(path), conversation, cache, workers=2, skip_bad_rows=True)
    assert len(store) == 7 and store.info["bad_rows"] == 3 and store.info["rows"] == 10
    assert [m.split(": ")[0].split(" line ")[1] for m in store.info["bad"]] == ["7", "8", "10"]
    assert store.where(6) == f"{path} line 9"
    # the store built skipping them is not used by a run that does not skip: the same line
    with pytest.raises(UserError, match="some_bad.jsonl line 7: invalid JSON"):
        load_store(str(path), conversation, cache, workers=2)


# ---------------- folders, empty files, the key

def test_folders_that_are_not_a_dataset_say_what_to_give(tmp_path):
    os.makedirs(tmp_path / "plain")
    write_jsonl(tmp_path / "plain" / "a.jsonl", [GOOD])
    with pytest.raises(UserError) as e:
        formats.expand_files(str(tmp_path / "plain"))
    assert str(e.value) == (f"{tmp_path}/plain is a folder, not a data file (nor a datasets "
                            "save_to_disk folder): give its files, e.g. "
                            f"'{tmp_path}/plain/*.jsonl'")
    for split in ("train", "test"):
        save_to_disk(tmp_path / "dict" / split, [GOOD], shards=1)
    (tmp_path / "dict" / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    with pytest.raises(UserError) as e:
        formats.expand_files(str(tmp_path / "dict"))
    assert str(e.value) == (f"{tmp_path}/dict is a datasets DatasetDict (splits: test, train): "
                            f"give one split's folder, e.g. {tmp_path}/dict/test")
    assert formats.expand_files(str(tmp_path / "dict" / "*")) == [
        f"{tmp_path}/dict/{s}/data-00000-of-00001.arrow" for s in ("test", "train")]
    state = json.loads((tmp_path / "dict" / "train" / "state.json").read_text())
    for change, message in (({"_data_files": [{"filename": "../../x.arrow"}]},
                             "lists '../../x.arrow', not a file of this folder"),
                            ({"_indices_data_files": [{"filename": "indices.arrow"}]},
                             "was saved with an indices mapping")):
        (tmp_path / "dict" / "train" / "state.json").write_text(json.dumps(state | change))
        with pytest.raises(UserError, match=re.escape(message)):
            formats.expand_files(str(tmp_path / "dict" / "train"))


def test_a_file_without_rows_says_so(tmp_path):
    conversation, cache = chat.Chat(demo_tokenizer()), str(tmp_path / "cache")
    pq.write_table(pa.table({"prompt": pa.array([], pa.string()),
                             "target": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    for name in ("empty.parquet", "blank.jsonl"):
        with pytest.raises(UserError, match=re.escape(f"{tmp_path}/{name} has no rows")):
            load_store(str(tmp_path / name), conversation, cache)
    write_jsonl(tmp_path / "one.jsonl", [GOOD])
    store, _, _ = load_store([str(tmp_path / "blank.jsonl"), str(tmp_path / "one.jsonl")],
                             conversation, cache)
    assert len(store) == 1 and store.info["file_rows"] == [0, 1]


def test_the_key_covers_each_file_and_the_shape(tmp_path):
    conversation = chat.Chat(demo_tokenizer())
    folder = save_to_disk(tmp_path / "saved", [GOOD] * 4)
    jsonl = write_jsonl(tmp_path / "a.jsonl", [GOOD])

    def key(files, keys=("prompt", "target", "messages", "tools", "auto")):
        return store_key(formats.expand_files(files), conversation, list(keys), str(tmp_path))

    before = key([folder, jsonl])
    assert key([folder, jsonl], ("prompt", "target", "messages", "tools", "messages")) != before
    shard = tmp_path / "saved" / "data-00001-of-00002.arrow"
    data = bytearray(shard.read_bytes())
    data[-20] ^= 1  # one bit of the second shard
    shard.write_bytes(bytes(data))
    assert key([folder, jsonl]) not in (before, key(jsonl))
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write(LINE)
    assert key(str(tmp_path / "a.jsonl.gz")) != key(jsonl)


def test_the_store_reads_a_few_chunks_ahead_not_the_whole_file():
    import multiprocessing
    from store import _in_order
    consumed = []

    def tasks():
        for i in range(100):
            consumed.append(i)
            yield i

    with multiprocessing.get_context("fork").Pool(2) as pool:
        results = _in_order(pool, abs, tasks(), 4)
        assert next(results) == 0 and len(consumed) == 4
        assert list(results) == list(range(1, 100))


def test_reading_streams_in_chunks_without_losing_a_row(tmp_path, monkeypatch):
    """Blocks of 64 bytes and chunks of 7 rows: lines that span blocks, array elements that do,
    blank lines, a last line without a newline; every row once, in order, at its own line."""
    monkeypatch.setattr(formats, "BLOCK", 64)
    rows = [{"prompt": f"q{i}" + "x" * (i % 90), "target": f"a{i}", "n": [1.5, None, i]}
            for i in range(300)]
    text = "".join(json.dumps(r) + "\n" + "\n" * (i % 3 == 0) for i, r in enumerate(rows))
    (tmp_path / "a.jsonl").write_text(text.rstrip("\n"))
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=1))
    spec = formats.Spec()
    for name in ("a.jsonl", "a.json"):
        got = [r for c in formats.chunks(str(tmp_path / name), 7, spec)
               for r in formats.rows_of_chunk(c, spec).rows]
        assert [r.messages[-1]["content"] for r in got] == [f"a{i}" for i in range(300)], name
        lines = (tmp_path / name).read_text().split("\n")
        for r in got:
            line = int(re.search(r"line (\d+)", r.where).group(1))
            assert lines[line - 1].strip() in (json.dumps(rows[int(r.messages[-1]["content"][1:])]),
                                               "{"), (name, r.where)
