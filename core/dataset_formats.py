"""Parse and validate uploaded JSONL training datasets, normalising every row to chat messages."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, NoReturn, TypeVar

__all__ = [
    "OBJECTIVES_BY_FORMAT",
    "DatasetFormat",
    "DatasetLineError",
    "ParsedDataset",
    "as_messages",
    "dump_jsonl",
    "parse_jsonl",
    "row_stats",
    "split_rows",
]

Message = dict[str, str]
# A supervised row is its chat messages; a preference row is {"prompt": [messages], "chosen": str, "rejected": str};
# an unpaired (KTO) row is {"prompt": [messages], "completion": str, "label": bool}; a reinforcement row (OpenAI's RFT
# file: messages ending on a user turn, and fields for its grader) is {"prompt": [messages], "item": {fields}}. Stored
# in that form, one a line.
Row = Any
T = TypeVar("T")

_UTF8_BOM = b"\xef\xbb\xbf"
_ROLES = ("system", "user", "assistant")
# OpenAI's chat fine-tuning format allows these beside role/content; anything else is most likely a typo.
_OPTIONAL_MESSAGE_KEYS = ("name", "weight")
# The attributes the interpreter and contextlib assign on a live exception (traceback, chaining, notes).
_EXCEPTION_RUNTIME_ATTRS = frozenset({"__traceback__", "__cause__", "__context__", "__suppress_context__", "__notes__"})


class DatasetFormat(str, Enum):
    """The row layouts an uploaded dataset may use."""

    CHAT = "chat"
    PROMPT_COMPLETION = "prompt_completion"
    INSTRUCTION = "instruction"
    OPENAI_PREFERENCE = "openai_preference"  # input.messages, preferred_output, non_preferred_output
    PREFERENCE = "preference"  # prompt, chosen, rejected
    UNPAIRED = "unpaired"  # prompt, completion, label (KTO)
    REINFORCEMENT = "reinforcement"  # messages ending on a user turn, and other fields a grader reads (OpenAI RFT)

    @property
    def kind(self) -> str:
        """What a row holds once parsed: "messages", "preference" (pairs) or "unpaired" (KTO)."""
        if self in (DatasetFormat.OPENAI_PREFERENCE, DatasetFormat.PREFERENCE):
            return "preference"
        if self is DatasetFormat.UNPAIRED:
            return "unpaired"
        if self is DatasetFormat.REINFORCEMENT:
            return "prompts"
        return "messages"


# Which training objectives a dataset of each kind can feed. Supervised rows give GRPO its prompts and the reference
# column its graders compare with; preference pairs also feed SFT (on the chosen answer), KTO (each pair unpaired:
# chosen desirable, rejected not) and GRPO (chosen as the reference); unpaired rows feed KTO only.
OBJECTIVES_BY_KIND: dict[str, tuple[str, ...]] = {
    "messages": ("sft", "grpo"),
    "preference": ("sft", "dpo", "orpo", "kto", "grpo"),
    "unpaired": ("kto",),
    "prompts": ("grpo",),
}
OBJECTIVES_BY_FORMAT: dict[str, tuple[str, ...]] = {f.value: OBJECTIVES_BY_KIND[f.kind] for f in DatasetFormat}


@dataclass(frozen=True)
class DatasetLineError(Exception):
    """The first problem found in an uploaded file, located by line and field."""

    line: int  # 1-based line number; 0 for problems with the file as a whole
    field: str
    message: str
    split: str = "train"

    def __post_init__(self) -> None:
        # The dataclass __init__ skips Exception.__init__; without args, str(exc) would be empty.
        Exception.__init__(self, self.message)

    def __reduce__(self) -> tuple[type[DatasetLineError], tuple[int, str, str, str]]:
        """Pickle by fields (Exception's default would call cls(message) and fail)."""
        return (type(self), (self.line, self.field, self.message, self.split))


def _allow_exception_runtime_attrs(cls: type[T]) -> type[T]:
    """Let a frozen exception class accept the attributes Python sets while raising it."""
    frozen_setattr = cls.__setattr__

    def __setattr__(self: Any, name: str, value: Any) -> None:
        if name in _EXCEPTION_RUNTIME_ATTRS:
            super(cls, self).__setattr__(name, value)
        else:
            frozen_setattr(self, name, value)

    cls.__setattr__ = __setattr__  # type: ignore[method-assign]
    return cls


# A frozen dataclass refuses every attribute assignment, including contextlib's
# `exc.__traceback__ = tb` and add_note(); raised inside any @contextmanager block
# (FastAPI dependencies, ExitStack) it would turn into FrozenInstanceError.
# dataclass() forbids defining __setattr__ in the class body, so patch it afterwards.
_allow_exception_runtime_attrs(DatasetLineError)


@dataclass(frozen=True)
class ParsedDataset:
    """A validated dataset: its detected format and every row as chat messages."""

    format: DatasetFormat
    rows: list[Row]


class _RowError(Exception):
    """A problem inside one row; parse_jsonl adds the line number and split."""

    def __init__(self, field: str, problem: str, *, missing: bool = False, subject: str | None = None) -> None:
        # subject starts the sentence; it defaults to the field path ("messages[1].role must be ...").
        self.field = field
        self.text = f"{subject or field} {problem}"
        self.missing = missing
        super().__init__(self.text)


def _json_type(value: object) -> str:
    """Name a parsed JSON value's type the way the user wrote it (object, array, number...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _check_encodable(field: str, value: str) -> None:
    """Reject strings holding lone surrogates, which JSON \\u escapes allow but UTF-8 cannot store, and NUL, which
    Postgres text cannot hold (an evaluation stores prompts and references)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _RowError(field, "contains an invalid \\u escape (an unpaired surrogate)") from None
    if "\x00" in value:
        raise _RowError(field, "contains a NUL character (\\u0000)")


def _required_str(obj: dict[str, Any], key: str, field: str | None = None) -> str:
    """Return obj[key], which must be a string that is not empty or whitespace."""
    field = field or key
    if key not in obj:
        raise _RowError(field, "is missing", missing=True)
    value = obj[key]
    if not isinstance(value, str):
        raise _RowError(field, f"must be a string; got {_json_type(value)}")
    if not value.strip():
        raise _RowError(field, "must not be empty")
    _check_encodable(field, value)
    return value


def _optional_str(obj: dict[str, Any], key: str) -> str:
    """Return obj[key] if it is a string with text; missing, null or blank count as absent."""
    value = obj.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _RowError(key, f"must be a string; got {_json_type(value)}")
    _check_encodable(key, value)
    return value if value.strip() else ""


def _chat_message(index: int, item: object) -> Message:
    """Validate one entry of "messages" and reduce it to role and content."""
    path = f"messages[{index}]"
    if not isinstance(item, dict):
        raise _RowError(path, f"must be an object with role and content; got {_json_type(item)}")
    for key in item:
        if key not in ("role", "content", *_OPTIONAL_MESSAGE_KEYS):
            raise _RowError(
                f"{path}.{key}", "is not an allowed key; a message may only have role, content, name, weight"
            )
    role = _required_str(item, "role", f"{path}.role")
    if role not in _ROLES:
        raise _RowError(f"{path}.role", f"must be one of {', '.join(_ROLES)}; got {role!r}")
    content = _required_str(item, "content", f"{path}.content")
    if "name" in item:
        _required_str(item, "name", f"{path}.name")
    # OpenAI's weight marks an assistant turn as trained-on (1) or not (0); we accept the flag
    # so OpenAI files upload unchanged, but the trainer learns from every assistant turn.
    if "weight" in item and (isinstance(item["weight"], bool) or item["weight"] not in (0, 1)):
        raise _RowError(f"{path}.weight", f"must be 0 or 1; got {json.dumps(item['weight'])}")
    return {"role": role, "content": content}


def _chat_row(obj: dict[str, Any]) -> Row:
    """Validate a {"messages": [...]} row."""
    if "messages" not in obj:
        raise _RowError("messages", "is missing", missing=True)
    items = obj["messages"]
    if not isinstance(items, list):
        raise _RowError("messages", f"must be an array of message objects; got {_json_type(items)}")
    if not items:
        raise _RowError("messages", "must not be empty")
    messages = [_chat_message(i, item) for i, item in enumerate(items)]
    # The model learns from assistant turns; a row that ends on another role teaches nothing at its end.
    return _check_turns(messages, "messages", "assistant", "that is what the model learns")


def _check_turns(messages: list[Message], field: str, last_role: str, why: str) -> list[Message]:
    """System only first, and the conversation ending on last_role (why says what needs it)."""
    for i, message in enumerate(messages[1:], start=1):
        if message["role"] == "system":
            raise _RowError(f"{field}[{i}].role", "may only be system on the first message")
    last = len(messages) - 1
    if messages[last]["role"] != last_role:
        raise _RowError(
            f"{field}[{last}].role",
            f"must be {last_role} on the last message{' of the prompt' if field != 'messages' else ''} ({why}); "
            f"got {messages[last]['role']!r}",
        )
    return messages


def _prompt_completion_row(obj: dict[str, Any]) -> Row:
    """Validate a {"prompt", "completion"} row and turn it into one user/assistant exchange."""
    prompt = _required_str(obj, "prompt")
    completion = _required_str(obj, "completion")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


def _instruction_row(obj: dict[str, Any]) -> Row:
    """Validate an Alpaca {"instruction", "input"?, "output", "system"?} row."""
    instruction = _required_str(obj, "instruction")
    output = _required_str(obj, "output")
    extra_input = _optional_str(obj, "input")
    system = _optional_str(obj, "system")
    user = f"{instruction}\n\n{extra_input}" if extra_input else instruction
    messages: Row = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return messages


def _prompt_messages(value: object, field: str) -> list[Message]:
    """A preference prompt: a string (one user message) or a message list ending on a user turn."""
    if isinstance(value, str):
        if not value.strip():
            raise _RowError(field, "must not be empty")
        _check_encodable(field, value)
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise _RowError(field, f"must be a string or an array of message objects; got {_json_type(value)}")
    if not value:
        raise _RowError(field, "must not be empty")
    messages = []
    for i, item in enumerate(value):
        try:
            messages.append(_chat_message(i, item))
        except _RowError as e:
            # _chat_message names "messages[i]..."; say where in this row the message is.
            raise _RowError(e.field.replace("messages", field, 1), e.text.split(" ", 1)[1]) from None
    return _check_turns(messages, field, "user", "the answers follow it")


def _answer(value: object, field: str) -> str:
    """A preference answer: a string, or a list of exactly one assistant message."""
    if isinstance(value, str):
        if not value.strip():
            raise _RowError(field, "must not be empty")
        _check_encodable(field, value)
        return value
    if not isinstance(value, list):
        raise _RowError(field, f"must be a string or an array of one assistant message; got {_json_type(value)}")
    if len(value) != 1:
        raise _RowError(field, f"must hold exactly one assistant message; got {len(value)}")
    try:
        message = _chat_message(0, value[0])
    except _RowError as e:
        raise _RowError(e.field.replace("messages", field, 1), e.text.split(" ", 1)[1]) from None
    if message["role"] != "assistant":
        raise _RowError(f"{field}[0].role", f"must be assistant; got {message['role']!r}")
    return message["content"]


def _pair(prompt: list[Message], chosen: str, rejected: str, rejected_field: str) -> dict[str, Any]:
    if chosen == rejected:
        # A pair that prefers an answer over itself teaches nothing and makes every margin 0.
        raise _RowError(rejected_field, "must differ from the chosen answer")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _preference_row(obj: dict[str, Any]) -> dict[str, Any]:
    """Validate a {"prompt", "chosen", "rejected"} row (strings or message lists)."""
    for key in ("prompt", "chosen", "rejected"):
        if key not in obj:
            raise _RowError(key, "is missing", missing=True)
    prompt = _prompt_messages(obj["prompt"], "prompt")
    return _pair(prompt, _answer(obj["chosen"], "chosen"), _answer(obj["rejected"], "rejected"), "rejected")


def _openai_preference_row(obj: dict[str, Any]) -> dict[str, Any]:
    """Validate OpenAI's DPO row: {"input": {"messages": [...]}, "preferred_output": [...], "non_preferred_output": [...]}."""
    for key in ("input", "preferred_output", "non_preferred_output"):
        if key not in obj:
            raise _RowError(key, "is missing", missing=True)
    source = obj["input"]
    if not isinstance(source, dict):
        raise _RowError("input", f"must be an object with messages; got {_json_type(source)}")
    if "messages" not in source:
        raise _RowError("input.messages", "is missing", missing=True)
    prompt = _prompt_messages(source["messages"], "input.messages")
    chosen = _answer(obj["preferred_output"], "preferred_output")
    rejected = _answer(obj["non_preferred_output"], "non_preferred_output")
    return _pair(prompt, chosen, rejected, "non_preferred_output")


def _unpaired_row(obj: dict[str, Any]) -> dict[str, Any]:
    """Validate a KTO {"prompt", "completion", "label": bool} row."""
    for key in ("prompt", "completion", "label"):
        if key not in obj:
            raise _RowError(key, "is missing", missing=True)
    label = obj["label"]
    if not isinstance(label, bool):
        raise _RowError("label", f"must be true (desirable) or false (undesirable); got {_json_type(label)}")
    prompt = _prompt_messages(obj["prompt"], "prompt")
    return {"prompt": prompt, "completion": _answer(obj["completion"], "completion"), "label": label}


def _reinforcement_row(obj: dict[str, Any]) -> dict[str, Any]:
    """Validate an OpenAI RFT row: {"messages": [... ending on user], <fields its grader reads>}."""
    if "messages" not in obj:
        raise _RowError("messages", "is missing", missing=True)
    prompt = _prompt_messages(obj["messages"], "messages")
    return {"prompt": prompt, "item": {k: v for k, v in obj.items() if k != "messages"}}


def _is_reinforcement(obj: dict[str, Any]) -> bool:
    """A first row with messages that end on a user turn and other fields beside them: an RFT file."""
    messages = obj.get("messages")
    last = messages[-1] if isinstance(messages, list) and messages else None
    return len(obj) > 1 and isinstance(last, dict) and last.get("role") == "user"


_ROW_PARSERS: dict[DatasetFormat, Any] = {
    DatasetFormat.CHAT: _chat_row,
    DatasetFormat.PROMPT_COMPLETION: _prompt_completion_row,
    DatasetFormat.INSTRUCTION: _instruction_row,
    DatasetFormat.OPENAI_PREFERENCE: _openai_preference_row,
    DatasetFormat.PREFERENCE: _preference_row,
    DatasetFormat.UNPAIRED: _unpaired_row,
    DatasetFormat.REINFORCEMENT: _reinforcement_row,
}


def as_messages(row: Row) -> list[Message]:
    """A row as one conversation: its messages; a pair's prompt and chosen answer; an unpaired row's prompt and
    completion (what SFT trains on and what generation metrics compare with)."""
    if isinstance(row, list):
        return row
    if "item" in row:  # a reinforcement row has no answer: its prompt and an empty turn (no reference to compare)
        return [*row["prompt"], {"role": "assistant", "content": ""}]
    answer = row["chosen"] if "chosen" in row else row["completion"]
    return [*row["prompt"], {"role": "assistant", "content": answer}]


def _row_chars(row: Row) -> int:
    if isinstance(row, list):
        return sum(len(m["content"]) for m in row)
    if "item" in row:
        return sum(len(m["content"]) for m in row["prompt"]) + len(json.dumps(row["item"], ensure_ascii=False))
    answers = [row["chosen"], row["rejected"]] if "chosen" in row else [row["completion"]]
    return sum(len(m["content"]) for m in row["prompt"]) + sum(len(a) for a in answers)


def _detect_format(obj: dict[str, Any]) -> DatasetFormat:
    """Pick the format from the first row's keys, or say which key is missing."""
    if "messages" in obj:
        return DatasetFormat.REINFORCEMENT if _is_reinforcement(obj) else DatasetFormat.CHAT
    if "preferred_output" in obj or "non_preferred_output" in obj:
        return DatasetFormat.OPENAI_PREFERENCE
    if "chosen" in obj or "rejected" in obj:
        return DatasetFormat.PREFERENCE
    if "prompt" in obj and "completion" in obj and "label" in obj:
        return DatasetFormat.UNPAIRED
    if "prompt" in obj and "completion" in obj:
        return DatasetFormat.PROMPT_COMPLETION
    if "instruction" in obj and "output" in obj:
        return DatasetFormat.INSTRUCTION
    # Name the missing half of a pair the row evidently meant to use, else the chat key.
    field = "messages"
    for first, second in (("prompt", "completion"), ("instruction", "output")):
        if first in obj or second in obj:
            field = second if first in obj else first
            break
    found = ", ".join(repr(k) for k in obj) or "none"
    raise _RowError(
        field,
        'is missing; each row needs "messages" (chat), "prompt" and "completion", "instruction" and "output", '
        '"prompt", "chosen" and "rejected" (preference), "input", "preferred_output" and "non_preferred_output" '
        f'(OpenAI preference) or "prompt", "completion" and "label" (KTO); this row has keys: {found}',
        missing=True,
    )


def _reject_constant(name: str) -> NoReturn:
    """Refuse NaN and Infinity, which Python's json accepts but JSON does not."""
    raise ValueError(f"{name} is not valid JSON")


def _load_object(text: str) -> dict[str, Any]:
    """Parse one line as a JSON object."""
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise _RowError("json", f"is not valid JSON: {exc.msg} at column {exc.colno}", subject="the line") from None
    except RecursionError:
        raise _RowError("json", "is JSON nested too deeply", subject="the line") from None
    except ValueError as exc:  # NaN/Infinity, or an integer too long to convert
        raise _RowError("json", f"is not valid JSON: {exc}", subject="the line") from None
    if not isinstance(value, dict):
        raise _RowError("json", f"must be a JSON object ({{...}}); got {_json_type(value)}", subject="the line")
    return value


def parse_jsonl(
    data: bytes,
    *,
    split: str = "train",
    max_rows: int,
    max_line_bytes: int,
    max_messages: int | None = None,
    max_chars: int | None = None,
) -> ParsedDataset:
    """Validate a JSONL upload and return its rows as chat messages; raise DatasetLineError on the first bad line.

    max_messages bounds the messages of one chat row (checked before they are validated one by one), max_chars the
    characters of text of one row, all messages together (what training tokenizes); None: no bound.
    """
    if max_rows < 1 or max_line_bytes < 1:
        raise ValueError("max_rows and max_line_bytes must be positive")

    def fail(line: int, field: str, text: str) -> NoReturn:
        raise DatasetLineError(line=line, field=field, message=f"line {line}: {text}", split=split)

    if data.startswith(_UTF8_BOM):
        data = data[len(_UTF8_BOM) :]
    fmt: DatasetFormat | None = None
    first_line = 0
    rows: list[Row] = []
    # Split on b"\n" only: str.splitlines would also break on U+2028 and other characters valid inside JSON strings.
    for line_no, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.removesuffix(b"\r")
        if len(raw) > max_line_bytes:
            fail(line_no, "line", f"the line is {len(raw)} bytes; the limit is {max_line_bytes} bytes")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            fail(line_no, "encoding", f"the line is not valid UTF-8 (at byte {exc.start + 1}); save the file as UTF-8")
        if not text.strip():
            continue
        if len(rows) == max_rows:
            raise DatasetLineError(
                line=0,
                field="file",
                message=f"the file has more than {max_rows} rows; the limit is {max_rows}",
                split=split,
            )
        try:
            obj = _load_object(text)
            if fmt is None:
                fmt, first_line = _detect_format(obj), line_no
            chat = fmt in (DatasetFormat.CHAT, DatasetFormat.REINFORCEMENT)
            items = obj.get("messages") if chat else obj.get("prompt")
            if fmt == DatasetFormat.OPENAI_PREFERENCE and isinstance(obj.get("input"), dict):
                items = obj["input"].get("messages")
            if max_messages is not None and isinstance(items, list) and len(items) > max_messages:
                raise _RowError(
                    "messages",
                    f"has {len(items)} messages; the limit is {max_messages} per row (TUNESERVE_MAX_MESSAGES_PER_ROW)",
                )
            row = _ROW_PARSERS[fmt](obj)
            chars = _row_chars(row)
            if max_chars is not None and chars > max_chars:
                raise _RowError(
                    "messages" if chat else "row",
                    f"has {chars} characters of text; the limit is {max_chars} per row (TUNESERVE_MAX_CHARS_PER_ROW)",
                    subject="the row",
                )
            rows.append(row)
        except _RowError as exc:
            text = exc.text
            if exc.missing and fmt is not None and first_line != line_no:
                # Most likely a row of another format pasted in: say which format the file is in.
                text += f" (line {first_line} set the file's format to {fmt.value}; every row must match)"
            fail(line_no, exc.field, text)
    if not rows:
        raise DatasetLineError(line=0, field="file", message="the file has no rows", split=split)
    assert fmt is not None
    return ParsedDataset(format=fmt, rows=rows)


def split_rows(rows: Sequence[T], *, test_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Deterministically hold out about test_fraction of rows; both parts keep the input order."""
    if not (math.isfinite(test_fraction) and 0 <= test_fraction < 1):
        raise ValueError(f"test_fraction must be at least 0 and below 1; got {test_fraction}")
    if test_fraction == 0:
        return list(rows), []
    if len(rows) < 2:
        raise ValueError(f"holding out a test split needs at least 2 rows; got {len(rows)}")
    n_test = min(max(round(len(rows) * test_fraction), 1), len(rows) - 1)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    test_idx = set(order[:n_test])
    train = [row for i, row in enumerate(rows) if i not in test_idx]
    test = [row for i, row in enumerate(rows) if i in test_idx]
    return train, test


def dump_jsonl(rows: Iterable[Row]) -> bytes:
    """Serialise rows as JSONL, UTF-8, newline-terminated: {"messages": [...]} per supervised row, a preference or
    unpaired row as its normalised object."""
    return "".join(
        json.dumps({"messages": row} if isinstance(row, list) else row, ensure_ascii=False) + "\n" for row in rows
    ).encode("utf-8")


def row_stats(rows: Iterable[Row]) -> dict[str, int]:
    """Count rows, messages, assistant messages and content characters."""
    stats = {"rows": 0, "messages": 0, "assistant_messages": 0, "chars": 0, "max_row_chars": 0}
    for row in rows:
        row_chars = _row_chars(row)
        messages = as_messages(row)
        stats["rows"] += 1
        stats["messages"] += len(messages)
        stats["assistant_messages"] += sum(m["role"] == "assistant" for m in messages)
        stats["chars"] += row_chars
        stats["max_row_chars"] = max(stats["max_row_chars"], row_chars)
    return stats
