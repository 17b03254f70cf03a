"""
formats.py: the data files people already have, read into rows of one conversation each
(docs/design.md, "Chat data"; chat.py renders them).

  expand_files   a path, a glob, a folder written by `datasets`' save_to_disk, or a list of them
                 -> the data files
  chunks         one file as it streams, in chunks of rows: parquet and Arrow by record batch, JSON
                 lines line by line, a JSON array element by element (never the whole file)
  rows_of_chunk  a chunk's rows as checked conversations (Row); a malformed row named, or skipped
  read_rows      every Row of some files (sample.py, tests)
  write_rows     sample.py's answers as training rows: parquet, and JSON lines (OpenAI messages)

Files, by suffix: .parquet; .arrow (Arrow IPC: the stream `datasets` writes, or the file format);
.jsonl / .ndjson (one JSON object per line); .json (a JSON array of rows, or JSON lines); the
JSON ones optionally compressed (.gz, .zst, .bz2: pyarrow's codecs). A save_to_disk folder is read
from its arrow files, as its state.json lists them, with pyarrow alone: the `datasets` package is
not needed, and a run reads the same rows (and builds the same store) with or without it.

The shape of a row, by its columns (JSON: its keys), data_format='auto':
  messages_key ('messages') or 'conversations'   a whole conversation, every assistant turn
      learned. Messages in the OpenAI shape ({role, content}; content a string or text parts;
      tool_calls; reasoning_content on assistant turns) or ShareGPT's ({from, value}: human, gpt,
      system, function_call, observation); a 'system' string beside them is the system message
  prompt_key + response_key   prompt / target: strings or lists of messages
plus an optional tools_key column of tool schemas (a list, or its JSON text). data_format=
'messages', 'sharegpt' or 'prompt_target' insists on one shape.

JSON is parsed with Python's json module, one row at a time, not with pyarrow.json: pyarrow infers
one type per column over a block of rows and stops where a row differs (content a string here and
text parts there, tool arguments an object here and a string there, tool schemas of other
shapes), reads no top-level array, and names no line. Lines travel as bytes to the workers that
tokenize them, so reading stays streaming and parallel.
"""

import codecs
import glob
import itertools
import json
import os
import re
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from configurator import UserError, first_line

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system",
                  "function_call": "assistant", "observation": "tool",
                  # the OpenAI names, which many "ShareGPT" sets use (OpenThoughts, Bespoke-Stratos)
                  "user": "user", "assistant": "assistant", "tool": "tool"}
DATA_FORMATS = ("auto", "prompt_target", "messages", "sharegpt")
CONVERSATIONS = "conversations"  # ShareGPT's column, read when messages_key's is absent
JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
COMPRESSION = {".gz": "gzip", ".zst": "zstd", ".bz2": "bz2"}
KINDS = ".parquet, .arrow, .jsonl, .json (JSON also .gz or .zst)"
DATASETS_FILES = ("state.json", "dataset_info.json", "dataset_dict.json")
BLOCK = 1 << 20  # bytes read at a time from a JSON file
SPACE = re.compile(r"[ \t\r\n]*")


class Spec(NamedTuple):
    """How rows are read: the column (or key) names and the shape asked for."""
    prompt_key: str = "prompt"
    response_key: str = "target"
    messages_key: str = "messages"
    tools_key: str = "tools"
    data_format: str = "auto"
    require_target: bool = True  # False when decoding: a prompt alone is a row


class Row(NamedTuple):
    """One conversation, checked, in the OpenAI shape the chat template takes."""
    messages: list  # system / user / assistant / tool messages
    first: int  # the index of the first learned message: its assistant turns on are learned
    tools: list  # tool schemas handed to the template, or None
    where: str  # "file row N" (parquet, arrow, a JSON array) or "file line N" (JSON lines)


class Chunk(NamedTuple):
    """Some consecutive rows of one file, as read (a task for a worker)."""
    path: str
    layout: str  # 'table': a pyarrow Table; 'lines': JSON lines; 'values': a JSON array's rows
    records: object  # the Table; [(line number, bytes)]; [(row, line number, value)]
    first: int  # a table's first row in its file


class Read(NamedTuple):
    """What rows_of_chunk made of a chunk."""
    rows: list  # the Rows
    numbers: list  # each Row's row (JSON lines: line) number in its file
    bad: list  # the error line of each malformed row skipped


# -------------------------------------------------------------------------------------------------
# which files

def expand_files(files):
    """A path, a glob, a save_to_disk folder, or a list of them -> the data files in order (a
    glob's sorted, a folder's arrow files as its state.json lists them). One error line for a
    pattern that matches nothing, a missing file, a file of no known format, or another folder."""
    patterns = [files] if isinstance(files, str) else list(files or [])
    paths = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise UserError(f"data files are paths or globs, got {pattern!r}")
        matches = [pattern]
        if glob.has_magic(pattern):  # `datasets`' bookkeeping beside the data is not data
            matches = sorted(p for p in glob.glob(pattern)
                             if os.path.basename(p) not in DATASETS_FILES)
        if not matches:
            raise UserError(f"no data file matches {pattern!r}")
        for path in matches:
            if os.path.isdir(path):
                paths += dataset_folder(path)
            elif not os.path.isfile(path):
                raise UserError(f"data file {path!r} not found")
            else:
                kind(path)  # a file of no known format fails here, before anything slow
                paths.append(path)
    if not paths:
        raise UserError("no data files given")
    return paths


def dataset_folder(folder):
    """The arrow files of a folder written by `datasets`' save_to_disk, in its state.json's order;
    one error line for any other folder (a DatasetDict's names its splits)."""
    folder = folder.rstrip("/") or "/"
    if os.path.isfile(os.path.join(folder, "dataset_dict.json")):
        splits = sorted(d for d in os.listdir(folder)
                        if os.path.isfile(os.path.join(folder, d, "state.json")))
        example = os.path.join(folder, splits[0] if splits else "train")
        raise UserError(f"{folder} is a datasets DatasetDict (splits: "
                        f"{', '.join(splits) or 'none'}): give one split's folder, e.g. {example}")
    state_path = os.path.join(folder, "state.json")
    if not os.path.isfile(state_path):
        raise UserError(f"{folder} is a folder, not a data file (nor a datasets save_to_disk "
                        f"folder): give its files, e.g. '{_glob_hint(folder)}'")
    try:
        with open(state_path) as f:
            state = json.load(f)
        listed = state["_data_files"]
        names = [entry["filename"] for entry in listed]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{state_path}: not a datasets state.json ({first_line(e)})") from None
    if state.get("_indices_data_files"):
        raise UserError(f"{folder} was saved with an indices mapping (an old datasets' select or "
                        "shuffle): its arrow files do not hold its rows in order; save it again "
                        "after dataset.flatten_indices()")
    paths = []
    for name in names:
        # a name with a folder in it is damage or a path traversal: neither is followed
        if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
            raise UserError(f"{state_path}: lists {name!r}, not a file of this folder")
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise UserError(f"{folder}: state.json lists {name}, which is missing")
        paths.append(path)
    if not paths:
        raise UserError(f"{state_path}: lists no arrow files")
    return paths


def _glob_hint(folder):
    """folder/*.<the most common data suffix among its files> (parquet when it has none)."""
    try:
        names = os.listdir(folder)
    except OSError:
        names = []
    found = {}
    for name in names:
        for suffix in (".parquet", ".arrow", *JSON_SUFFIXES):
            for compressed in ("", *COMPRESSION):
                if name.lower().endswith(suffix + compressed):
                    found[suffix + compressed] = found.get(suffix + compressed, 0) + 1
    best = max(found, key=lambda s: (found[s], s)) if found else ".parquet"
    return os.path.join(folder, f"*{best}")


def kind(path):
    """'parquet', 'arrow' or 'json', by the suffix (a compression suffix aside), or by the first
    bytes when the suffix says nothing (a parquet named x.tmp); one error line otherwise."""
    name, compression = _plain_name(path)
    if name.endswith(JSON_SUFFIXES):
        if compression and not pa.Codec.is_available(compression):
            raise UserError(f"{path}: this pyarrow was built without {compression}: decompress "
                            "the file first")
        return "json"
    if compression:
        raise UserError(f"{path}: only JSON files are read compressed (x.jsonl.gz, x.json.zst); "
                        "parquet and arrow files compress inside")
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".arrow"):
        return "arrow"
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    if head.startswith(b"PAR1"):
        return "parquet"
    if head.startswith((b"ARROW1", b"\xff\xff\xff\xff")):
        return "arrow"
    if head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] in (b"{", b"["):
        return "json"
    raise UserError(f"{path}: not a data file this reads ({KINDS}; or a folder written by "
                    "datasets' save_to_disk)")


def count_rows(path):
    """The number of rows, when the file says it without being read (parquet), else None."""
    if kind(path) != "parquet":
        return None
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (pa.ArrowException, OSError):
        return None  # chunks says what is wrong with the file


# -------------------------------------------------------------------------------------------------
# reading a file, as it streams

def chunks(path, size, spec=None):
    """The rows of one file in Chunks of about `size` rows, read as the file streams. A table's
    columns are checked against spec first: a missing column is one error for the file."""
    what = kind(path)
    try:
        if what == "json":
            yield from _json_chunks(path, size)
            return
        if what == "parquet":
            source = pq.ParquetFile(path)
            schema, batches = source.schema_arrow, source.iter_batches(batch_size=size)
        else:
            schema, batches = _arrow_batches(path)
        if spec is not None:
            shape_of(schema.names, path, spec)
        row = 0
        for batch in batches:
            for at in range(0, batch.num_rows, size):
                # a slice would carry (and pickle) its whole batch's buffers: take copies its rows
                part = (batch if batch.num_rows <= size else
                        batch.take(pa.array(range(at, min(at + size, batch.num_rows)))))
                yield Chunk(path, "table", pa.Table.from_batches([part]), row)
                row += part.num_rows
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: cannot read {what} ({first_line(e)})") from None


def _arrow_batches(path):
    """(schema, record batches) of an Arrow IPC file, memory-mapped: the stream format `datasets`
    writes, or the random-access file format."""
    try:
        reader = pa.ipc.open_stream(pa.memory_map(path))
        return reader.schema, reader
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(pa.memory_map(path))
        return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))


def _plain_name(path):
    """(the file's name in lower case without its compression suffix, the codec or None)."""
    name = os.path.basename(path).lower()
    for suffix, codec in COMPRESSION.items():
        if name.endswith(suffix):
            return name[:-len(suffix)], codec
    return name, None


def _blocks(path):
    """A file's bytes in blocks, decompressed by its suffix with pyarrow's codecs."""
    with pa.input_stream(path, compression=_plain_name(path)[1]) as stream:
        while block := stream.read(BLOCK):
            yield block


def _json_chunks(path, size):
    """A JSON file's rows: a top-level array element by element, else one row per line (blank
    lines skipped; each line kept as bytes, parsed by rows_of_chunk)."""
    blocks, head = _blocks(path), b""
    for block in blocks:
        head += block
        if head.lstrip(b"\xef\xbb\xbf \t\r\n"):
            break
    if head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"[":
        yield from _json_array(path, head, blocks, size)
        return
    lines, number, carry = [], 1, []  # carry: the pieces of a line not ended yet
    for block in itertools.chain([head], blocks):
        if b"\n" not in block:
            carry.append(block)
            continue
        *complete, tail = block.split(b"\n")
        complete[0] = b"".join(carry) + complete[0]
        carry = [tail]
        for line in complete:
            if line.strip():
                lines.append((number, line + b"\n"))
            number += 1
        while len(lines) >= size:
            yield Chunk(path, "lines", lines[:size], 0)
            lines = lines[size:]
    last = b"".join(carry)
    if last.strip():
        lines.append((number, last))  # no newline at its end: it may be cut short
    if lines:
        yield Chunk(path, "lines", lines, 0)


def _json_array(path, head, blocks, size):
    """The rows of a JSON array, element by element, from a text buffer that holds the element
    being parsed and a block more: never the whole file. A syntax error stops the file (where the
    next row starts cannot be known), naming its line."""
    decode = codecs.getincrementaldecoder("utf-8-sig")().decode
    decoder = json.JSONDecoder()
    s = {"text": "", "at": 0, "line": 1, "counted": 0, "done": False}

    def line_at(at):  # the line number at position `at` of the buffer (counted once)
        s["line"] += s["text"].count("\n", s["counted"], at)
        s["counted"] = at
        return s["line"]

    def fill():  # read a block more, dropping what is parsed
        line_at(s["at"])
        block = next(blocks, None)
        try:
            more = decode(block or b"", final=block is None)
        except UnicodeDecodeError as e:
            raise UserError(f"{path} line {s['line']}: not UTF-8 text ({e.reason})") from None
        s["text"], s["at"], s["counted"], s["done"] = s["text"][s["at"]:] + more, 0, 0, \
            block is None

    def peek():  # the next character after whitespace, reading on as needed; "" at the end
        while True:
            s["at"] = SPACE.match(s["text"], s["at"]).end()
            if s["at"] < len(s["text"]) or s["done"]:
                return s["text"][s["at"]:s["at"] + 1]
            fill()

    def error(what):
        return UserError(f"{path} line {line_at(min(s['at'], len(s['text'])))}: {what}")

    blocks = itertools.chain([head], blocks)
    fill()
    peek()
    s["at"] += 1  # the "["
    row, batch, after_row = 0, [], False
    while True:
        c = peek()
        if c == "":
            raise error("the JSON array is cut short (no closing ']'): was the file written "
                        "completely?")
        if c == "]":
            if row and not after_row:
                raise error("invalid JSON (a ',' before the closing ']')")
            s["at"] += 1
            break
        if after_row:
            if c != ",":
                raise error(f"invalid JSON (expected ',' or ']' after row {row - 1}, got {c!r})")
            s["at"], after_row = s["at"] + 1, False
            continue
        while True:
            try:
                value, end = decoder.raw_decode(s["text"], s["at"])
                if end < len(s["text"]) or s["done"]:  # a number at the buffer's end may go on
                    break
            except ValueError as e:
                # an error at the buffer's end may be an element that goes on in the next block
                unterminated = e.msg.startswith("Unterminated string")
                if not s["done"] and (e.pos >= len(s["text"]) - 8 or unterminated):
                    fill()
                    continue
                where = f"{path} row {row} (line {line_at(s['at'])})"
                if e.pos >= len(s["text"].rstrip()) or unterminated:
                    raise UserError(f"{where}: the JSON array is cut short ({e.msg}): was the file "
                                    "written completely?") from None
                raise UserError(f"{where}: invalid JSON ({e.msg}, line "
                                f"{line_at(e.pos)})") from None
            fill()
        batch.append((row, line_at(s["at"]), value))
        s["at"], row, after_row = end, row + 1, True
        if len(batch) >= size:
            yield Chunk(path, "values", batch, 0)
            batch = []
    if peek() != "":
        raise error("invalid JSON (more after the array's closing ']')")
    if batch:
        yield Chunk(path, "values", batch, 0)


# -------------------------------------------------------------------------------------------------
# a row -> a conversation

def rows_of_chunk(chunk, spec, skip=False):
    """The Rows of a chunk with their row (JSON lines: line) numbers. A malformed row raises its
    one-line UserError, or with skip is left out and its line kept in bad."""
    read = Read([], [], [])
    for number, where, record, noun in _records(chunk):
        try:
            if isinstance(record, UserError):
                raise record
            read.rows.append(row_of(record, where, spec, noun))
            read.numbers.append(number)
        except UserError as e:
            if not skip:
                raise
            read.bad.append(str(e))
    return read


def _records(chunk):
    """(number, where, record or the UserError of a line that is not a row, noun) per row."""
    path = chunk.path
    if chunk.layout == "table":
        for i, record in enumerate(chunk.records.to_pylist()):
            yield chunk.first + i, f"{path} row {chunk.first + i}", record, "column"
        return
    if chunk.layout == "values":
        for row, line, value in chunk.records:
            where = f"{path} row {row} (line {line})"
            yield row, where, value if isinstance(value, dict) else UserError(
                f"{where}: expected a JSON object (one row), got {_type(value)}"), "key"
        return
    hint = (" (a .json file holds a JSON array of rows, or one row per line)"
            if _plain_name(path)[0].endswith(".json") else "")
    for line, raw in chunk.records:
        where = f"{path} line {line}"
        ended = raw.endswith(b"\n")
        try:
            value = json.loads(raw[:-1] if ended else raw)  # columns within the line
        except UnicodeDecodeError as e:
            value = UserError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})")
        except ValueError as e:
            if not ended:
                value = UserError(f"{where}: the last line is cut short ({e.msg}, column "
                                  f"{e.colno}): was the file written completely?")
            else:
                value = UserError(f"{where}: invalid JSON ({e.msg}, column {e.colno}){hint}")
        if not isinstance(value, (dict, UserError)):
            value = UserError(f"{where}: expected a JSON object (one row), got {_type(value)}")
        yield line, where, value, "key"


def shape_of(names, where, spec, noun="column"):
    """(shape, column) from the columns a file has (or the keys of a JSON row): a conversation
    shape ('auto', 'messages', 'sharegpt') and the column holding it, or ('prompt_target', None).
    One error naming what is missing."""
    names = list(names)
    column = next((c for c in (spec.messages_key, CONVERSATIONS) if c in names), None)
    shown = ", ".join(names) or "none"
    if spec.data_format in ("messages", "sharegpt"):
        if column is None:
            raise UserError(f"{where}: missing {noun} {spec.messages_key!r} (data_format="
                            f"{spec.data_format!r}; {noun}s: {shown}; set messages_key)")
        return spec.data_format, column
    if column is not None and spec.data_format == "auto":
        return "auto", column
    for key in (spec.prompt_key, spec.response_key) if spec.require_target else (spec.prompt_key,):
        if key not in names:
            raise UserError(f"{where}: missing {noun} {key!r} ({noun}s: {shown}; set prompt_key / "
                            f"response_key, or give a {spec.messages_key!r} or {CONVERSATIONS!r} "
                            f"{noun}, or set data_format)")
    return "prompt_target", None


def row_of(record, where, spec, noun="column"):
    """One row (a dict of columns) as a checked Row, or one error naming where and what."""
    shape, column = shape_of(record, where, spec, noun)
    tools = _tools(record.get(spec.tools_key), where, spec.tools_key, noun)
    if shape != "prompt_target":
        value = record[column]
        if isinstance(value, str):  # a whole conversation has roles: a string has none
            raise UserError(f"{where}: {noun} {column!r} must be a list of {{role, content}} "
                            f"messages, got a string (a prompt belongs in {spec.prompt_key!r})")
        messages = check_messages(value, where, column, noun, shape)
        system = record.get("system")  # ShareGPT sets keep the system prompt beside the turns
        if isinstance(system, str) and system.strip() and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}] + messages
        if spec.require_target and not any(m["role"] == "assistant" for m in messages):
            raise UserError(f"{where}: {noun} {column!r} has no assistant message to learn")
        return Row(messages, 0, tools, where)
    messages = check_messages(record[spec.prompt_key], where, spec.prompt_key, noun)
    target = record.get(spec.response_key)
    if target is None and not spec.require_target:
        return Row(messages, len(messages), tools, where)
    if isinstance(target, str):
        if not target.strip():
            raise UserError(f"{where}: {noun} {spec.response_key!r} is empty")
        reply = [{"role": "assistant", "content": target}]
    else:
        reply = check_messages(target, where, spec.response_key, noun)
        if not any(m["role"] == "assistant" for m in reply):
            raise UserError(f"{where}: {noun} {spec.response_key!r} has no assistant message")
    return Row(messages + reply, len(messages), tools, where)


def _clean(value):
    """Parquet gives every struct all the keys of its column (None where a row has none), and JSON
    writes null for absent fields: drop those."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _type(value):
    return {dict: "an object", list: "a list", str: "a string", type(None): "null"}.get(
        type(value), type(value).__name__)


def check_messages(value, where, column, noun="column", shape="auto"):
    """A cell as a list of OpenAI-shaped messages: a plain string becomes one user message;
    ShareGPT messages ({from, value}) are mapped to roles; text parts are joined. shape
    'messages' or 'sharegpt' insists on that message shape. Raises UserError naming the row."""
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    if not isinstance(value, (list, tuple)) or not value:
        kind_ = "an empty list" if isinstance(value, (list, tuple)) else type(value).__name__
        raise UserError(f"{where}: {noun} {column!r} must be a string or a list of "
                        f"{{role, content}} messages, got {kind_}")
    messages = []
    for i, m in enumerate(_clean(list(value))):
        label = f"{noun} {column!r} message {i}"
        if isinstance(m, dict) and "from" in m and "role" not in m and shape != "messages":
            m = _sharegpt(m, where, label)
        elif shape == "sharegpt":
            raise UserError(f"{where}: {label} must have 'from' and 'value' (data_format="
                            "'sharegpt')")
        messages.append(_message(m, where, label, shape))
    return messages


def _message(m, where, label, shape):
    """One OpenAI-shaped message, checked: its role, content (text parts joined), tool calls,
    reasoning."""
    if not isinstance(m, dict) or "role" not in m:
        hint = (" (a ShareGPT message? set data_format='sharegpt')"
                if isinstance(m, dict) and "from" in m else "")
        raise UserError(f"{where}: {label} must have 'role' and 'content'{hint}")
    if m["role"] not in ROLES:
        raise UserError(f"{where}: {label} has unknown role {m['role']!r} (expected one of "
                        f"{', '.join(ROLES)})")
    content, calls = m.get("content"), m.get("tool_calls")
    if isinstance(content, list):
        content = m["content"] = _text_parts(content, where, label)
    if content is None and not calls:
        raise UserError(f"{where}: {label} must have 'role' and 'content'")
    if content is not None and not isinstance(content, str):
        raise UserError(f"{where}: {label} content must be a string, got "
                        f"{type(content).__name__}")
    if not (content or "").strip() and not calls:
        raise UserError(f"{where}: {label} has empty content")
    if calls is not None and (m["role"] != "assistant" or not isinstance(calls, list)):
        raise UserError(f"{where}: {label}: tool_calls must be a list, on an assistant message")
    reasoning = m.get("reasoning_content")
    if reasoning is not None and (m["role"] != "assistant" or not isinstance(reasoning, str)):
        raise UserError(f"{where}: {label}: reasoning_content must be a string, on an assistant "
                        f"message (got {type(reasoning).__name__} on {m['role']!r})")
    # no content key for a tool call without content (transformers >= 5.24 drops None too)
    return m


def _text_parts(parts, where, label):
    """OpenAI's content parts ([{type: text, text}]) as one text, joined by newlines as vLLM joins
    them for a text-only model; any other part (an image) is an error, not dropped."""
    texts = []
    for j, part in enumerate(parts):
        if not isinstance(part, dict) or part.get("type", "text") != "text" or \
                not isinstance(part.get("text"), str):
            got = part.get("type") if isinstance(part, dict) else _type(part)
            raise UserError(f"{where}: {label} content part {j} must be {{'type': 'text', "
                            f"'text': ...}}, got {got!r}: only text is read")
        texts.append(part["text"])
    return "\n".join(texts)


def _sharegpt(m, where, label):
    """A ShareGPT message ({from, value}) in the OpenAI shape: human -> user, gpt -> assistant,
    function_call -> an assistant tool call, observation -> tool."""
    role, value = m.get("from"), m.get("value")
    if role not in SHAREGPT_ROLES:
        raise UserError(f"{where}: {label} has unknown role {role!r} (ShareGPT 'from': expected "
                        "one of human, gpt, system, function_call, observation)")
    if not isinstance(value, str):
        raise UserError(f"{where}: {label} value must be a string, got "
                        f"{'nothing' if value is None else type(value).__name__}")
    if role != "function_call":
        return {"role": SHAREGPT_ROLES[role], "content": value}
    try:  # {"name": ..., "arguments": ...}, or a list of them (parallel calls)
        calls = json.loads(value)
        calls = calls if isinstance(calls, list) else [calls]
        tool_calls = [{"type": "function", "function": {"name": c["name"],
                                                        "arguments": c.get("arguments", {})}}
                      for c in calls if isinstance(c["name"], str)]
    except (ValueError, KeyError, TypeError):
        tool_calls = []
    if not tool_calls:
        raise UserError(f"{where}: {label}: a function_call's value must be the JSON of "
                        '{"name": ..., "arguments": ...} (or a list of them)')
    return {"role": "assistant", "tool_calls": tool_calls}


def _tools(value, where, column, noun="column"):
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise UserError(f"{where}: {noun} {column!r} is not valid JSON ({e})") from None
    if not isinstance(value, list):
        raise UserError(f"{where}: {noun} {column!r} must be a list of tool schemas, got "
                        f"{type(value).__name__}")
    return _clean(value) or None


def read_rows(paths, prompt_key="prompt", response_key="target", messages_key="messages",
              tools_key="tools", require_target=True, data_format="auto"):
    """Every Row of the files, in order (see the module's docstring for the shapes)."""
    spec = Spec(prompt_key, response_key, messages_key, tools_key, data_format, require_target)
    rows = []
    for path in paths:
        for chunk in chunks(path, 4096, spec):
            rows += rows_of_chunk(chunk, spec).rows
    return rows


def write_rows(rows, parquet_path, jsonl_path):
    """sample.py's training rows as a prompt/target parquet for train.py and as JSON lines in the
    OpenAI `messages` shape for other tools; each written to a .tmp file first, then renamed."""
    if parquet_path:
        pq.write_table(pa.Table.from_pylist([{"prompt": r["prompt"], "target": r["target"]}
                                             for r in rows]), parquet_path + ".tmp")
        os.replace(parquet_path + ".tmp", parquet_path)
    if jsonl_path:
        with open(jsonl_path + ".tmp", "w") as f:
            for r in rows:
                line = {"messages": r["prompt"] + r["target"]}
                if r["tools"]:
                    line["tools"] = r["tools"]
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
        os.replace(jsonl_path + ".tmp", jsonl_path)
