"""Tests for core.dataset_formats: JSONL parsing, validation, splitting and serialisation."""

from __future__ import annotations

import contextlib
import json
import pickle
from typing import Any

import pytest

from core.dataset_formats import (
    DatasetFormat,
    DatasetLineError,
    ParsedDataset,
    dump_jsonl,
    parse_jsonl,
    row_stats,
    split_rows,
)

LIMITS: dict[str, int] = {"max_rows": 1000, "max_line_bytes": 10_000}


def jsonl(*rows: Any) -> bytes:
    """Encode rows as JSONL; str rows are written verbatim so tests can inject broken lines."""
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode("utf-8")


def parse(data: bytes, **kwargs: Any) -> ParsedDataset:
    """parse_jsonl with roomy default limits."""
    return parse_jsonl(data, **{**LIMITS, **kwargs})


def parse_error(data: bytes, **kwargs: Any) -> DatasetLineError:
    """Parse data that must fail, returning the error."""
    with pytest.raises(DatasetLineError) as info:
        parse(data, **kwargs)
    return info.value


def assert_error(err: DatasetLineError, line: int, field: str, phrase: str) -> None:
    """Check an error's line, field and that its message says phrase (and names the line)."""
    assert (err.line, err.field) == (line, field), err.message
    assert phrase in err.message, err.message
    if line:
        assert err.message.startswith(f"line {line}: ")


def chat(*pairs: tuple[str, str]) -> dict[str, Any]:
    """A chat row from (role, content) pairs."""
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


GOOD_CHAT = chat(("user", "hi"), ("assistant", "hello"))


# --- happy paths -------------------------------------------------------------------------------


def test_chat_rows_keep_roles_and_content_and_drop_optional_keys() -> None:
    row = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi", "name": "ann"},
            {"role": "assistant", "content": "  hello  ", "weight": 1},
        ],
        "id": "extra top-level keys are ignored",
    }
    ds = parse(jsonl(row, GOOD_CHAT))
    assert ds.format is DatasetFormat.CHAT
    assert ds.rows[0] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "  hello  "},  # whitespace is content, not trimmed
    ]
    assert ds.rows[1] == GOOD_CHAT["messages"]


def test_chat_allows_multi_turn_rows() -> None:
    row = chat(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"))
    assert parse(jsonl(row)).rows == [row["messages"]]


def test_prompt_completion_becomes_user_assistant() -> None:
    ds = parse(jsonl({"prompt": "2+2?", "completion": "4"}, {"prompt": "ü", "completion": "ß", "meta": 1}))
    assert ds.format is DatasetFormat.PROMPT_COMPLETION
    assert ds.rows == [
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
        [{"role": "user", "content": "ü"}, {"role": "assistant", "content": "ß"}],
    ]


def test_instruction_joins_input_and_adds_system() -> None:
    ds = parse(
        jsonl(
            {"instruction": "Translate", "input": "hola", "output": "hello"},
            {"instruction": "Say hi", "input": "", "output": "hi"},
            {"instruction": "Say hi", "output": "hi", "input": None},
            {"instruction": "Count", "output": "1 2", "system": "You are terse."},
        )
    )
    assert ds.format is DatasetFormat.INSTRUCTION
    assert ds.rows == [
        [{"role": "user", "content": "Translate\n\nhola"}, {"role": "assistant", "content": "hello"}],
        [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}],
        [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}],
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Count"},
            {"role": "assistant", "content": "1 2"},
        ],
    ]


def test_blank_lines_skipped_crlf_and_missing_final_newline_ok() -> None:
    data = b"\n  \r\n" + json.dumps(GOOD_CHAT).encode() + b"\r\n\t\n" + json.dumps(GOOD_CHAT).encode()
    assert len(parse(data).rows) == 2


def test_blank_lines_still_count_for_line_numbers() -> None:
    data = jsonl(GOOD_CHAT, "", "   ", "{oops")
    assert_error(parse_error(data), 4, "json", "not valid JSON")


def test_bom_at_start_is_tolerated() -> None:
    assert parse(b"\xef\xbb\xbf" + jsonl(GOOD_CHAT)).rows == [GOOD_CHAT["messages"]]


def test_unicode_line_separator_inside_a_string_is_not_a_line_break() -> None:
    row = chat(("user", "a\u2028b"), ("assistant", "c\x85d"))
    data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
    assert parse(data).rows == [row["messages"]]


# --- file-level errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"\n\n  \n\t\r\n", b"\xef\xbb\xbf"], ids=["empty", "blank", "bom-only"])
def test_file_without_rows(data: bytes) -> None:
    assert_error(parse_error(data), 0, "file", "the file has no rows")


def test_too_many_rows() -> None:
    err = parse_error(jsonl(GOOD_CHAT, GOOD_CHAT, "", GOOD_CHAT), max_rows=2)
    assert_error(err, 0, "file", "more than 2 rows")


def test_exactly_max_rows_is_fine() -> None:
    assert len(parse(jsonl(GOOD_CHAT, GOOD_CHAT), max_rows=2).rows) == 2


def test_line_too_long() -> None:
    long_row = chat(("user", "x" * 200), ("assistant", "y"))
    err = parse_error(jsonl(GOOD_CHAT, long_row), max_line_bytes=100)
    assert_error(err, 2, "line", "the limit is 100 bytes")


def test_non_utf8_reports_the_bad_line() -> None:
    data = jsonl(GOOD_CHAT, GOOD_CHAT) + b'{"prompt": "caf\xe9"}\n' + jsonl(GOOD_CHAT)
    assert_error(parse_error(data), 3, "encoding", "not valid UTF-8 (at byte 16)")


def test_split_name_is_carried_on_errors() -> None:
    err = parse_error(b"[1]\n", split="test")
    assert err.split == "test"
    assert_error(err, 1, "json", "got array")


@pytest.mark.parametrize("limits", [{"max_rows": 0}, {"max_line_bytes": 0}])
def test_limits_must_be_positive(limits: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        parse(jsonl(GOOD_CHAT), **limits)


# --- line-level JSON errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "phrase"),
    [
        ('{"messages": [}', "not valid JSON: Expecting value at column 15"),
        ("[1, 2]", "must be a JSON object ({...}); got array"),
        ('"just a string"', "got string"),
        ('{"prompt": NaN, "completion": "x"}', "NaN is not valid JSON"),
        ("[" * 100_000, "nested too deeply"),
    ],
    ids=["syntax", "array", "string", "nan", "deep"],
)
def test_line_not_a_json_object(line: str, phrase: str) -> None:
    err = parse_error(jsonl(GOOD_CHAT, line), max_line_bytes=1_000_000)
    assert_error(err, 2, "json", phrase)


# --- format detection and mixing -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({"text": "hi"}, "messages"),
        ({}, "messages"),
        ({"prompt": "hi"}, "completion"),
        ({"completion": "hi"}, "prompt"),
        ({"instruction": "hi", "input": "x"}, "output"),
        ({"output": "hi"}, "instruction"),
    ],
)
def test_undetectable_first_row_names_the_missing_key(row: dict[str, Any], field: str) -> None:
    err = parse_error(jsonl(row))
    assert_error(err, 1, field, f'{field} is missing; each row needs "messages" (chat)')


def test_mixed_formats_name_the_missing_field_and_the_file_format() -> None:
    err = parse_error(jsonl({"prompt": "a", "completion": "b"}, GOOD_CHAT))
    assert_error(err, 2, "prompt", "prompt is missing (line 1 set the file's format to prompt_completion")


def test_mixed_formats_chat_file_with_instruction_row() -> None:
    err = parse_error(jsonl("", GOOD_CHAT, {"instruction": "a", "output": "b"}))
    assert_error(err, 3, "messages", "messages is missing (line 2 set the file's format to chat")


# --- chat validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "field", "phrase"),
    [
        ({"messages": "hi"}, "messages", "must be an array of message objects; got string"),
        ({"messages": []}, "messages", "messages must not be empty"),
        ({"messages": ["hi"]}, "messages[0]", "must be an object with role and content; got string"),
        (
            chat(("user", "hi"), ("bot", "x")),
            "messages[1].role",
            "messages[1].role must be one of system, user, assistant; got 'bot'",
        ),
        ({"messages": [{"content": "x"}]}, "messages[0].role", "messages[0].role is missing"),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "messages[0].content is missing"),
        (chat(("user", "hi"), ("assistant", "  \n")), "messages[1].content", "messages[1].content must not be empty"),
        (chat(("system", ""), ("user", "hi"), ("assistant", "x")), "messages[0].content", "must not be empty"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "must be a string; got number"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content", "got array"),
        ({"messages": [{"role": None, "content": "x"}]}, "messages[0].role", "must be a string; got null"),
        (
            {"messages": [{"role": "assistant", "content": "x", "tool_calls": []}]},
            "messages[0].tool_calls",
            "is not an allowed key; a message may only have role, content, name, weight",
        ),
        (
            {"messages": [{"role": "assistant", "content": "x", "weight": 2}]},
            "messages[0].weight",
            "must be 0 or 1; got 2",
        ),
        ({"messages": [{"role": "assistant", "content": "x", "name": 3}]}, "messages[0].name", "got number"),
        (chat(("user", "hi")), "messages[0].role", "must be assistant on the last message"),
        (chat(("user", "hi"), ("assistant", "x"), ("user", "more?")), "messages[2].role", "got 'user'"),
        (chat(("system", "s")), "messages[0].role", "must be assistant on the last message"),
        (
            chat(("user", "hi"), ("system", "s"), ("assistant", "x")),
            "messages[1].role",
            "may only be system on the first message",
        ),
        (chat(("user", "\ud800"), ("assistant", "x")), "messages[0].content", "unpaired surrogate"),
    ],
    ids=[
        "not-list",
        "empty-list",
        "item-not-object",
        "unknown-role",
        "role-missing",
        "content-missing",
        "blank-content",
        "empty-system",
        "content-number",
        "content-parts",
        "role-null",
        "unknown-key",
        "bad-weight",
        "name-number",
        "only-user",
        "last-is-user",
        "only-system",
        "system-not-first",
        "lone-surrogate",
    ],
)
def test_chat_errors(row: dict[str, Any], field: str, phrase: str) -> None:
    err = parse_error(jsonl(GOOD_CHAT, row))
    assert_error(err, 2, field, phrase)


def test_first_bad_line_wins() -> None:
    err = parse_error(jsonl(GOOD_CHAT, chat(("user", "x")), "not json"))
    assert_error(err, 2, "messages[0].role", "last message")


# --- prompt/completion and instruction validation -----------------------------------------------


@pytest.mark.parametrize(
    ("row", "field", "phrase"),
    [
        ({"prompt": "", "completion": "x"}, "prompt", "prompt must not be empty"),
        ({"prompt": "q", "completion": " "}, "completion", "completion must not be empty"),
        ({"prompt": ["q"], "completion": "x"}, "prompt", "prompt must be a string; got array"),
        ({"prompt": "q", "completion": True}, "completion", "completion must be a string; got boolean"),
    ],
)
def test_prompt_completion_errors(row: dict[str, Any], field: str, phrase: str) -> None:
    err = parse_error(jsonl({"prompt": "q", "completion": "a"}, row))
    assert_error(err, 2, field, phrase)


@pytest.mark.parametrize(
    ("row", "field", "phrase"),
    [
        ({"instruction": " ", "output": "x"}, "instruction", "instruction must not be empty"),
        ({"instruction": "i", "output": ""}, "output", "output must not be empty"),
        ({"instruction": "i", "output": 1.5}, "output", "output must be a string; got number"),
        ({"instruction": "i", "output": "o", "input": {}}, "input", "input must be a string; got object"),
        ({"instruction": "i", "output": "o", "system": 0}, "system", "system must be a string; got number"),
    ],
)
def test_instruction_errors(row: dict[str, Any], field: str, phrase: str) -> None:
    err = parse_error(jsonl({"instruction": "i", "output": "o"}, row))
    assert_error(err, 2, field, phrase)


# --- the error type ------------------------------------------------------------------------------


def test_error_str_pickle_and_immutability() -> None:
    err = DatasetLineError(line=3, field="prompt", message="line 3: prompt must not be empty", split="test")
    assert str(err) == err.message
    assert pickle.loads(pickle.dumps(err)) == err
    with pytest.raises(AttributeError):
        err.line = 4  # type: ignore[misc]


def test_error_survives_contextmanager_and_notes() -> None:
    # contextlib assigns exc.__traceback__, which a plain frozen dataclass would refuse.
    @contextlib.contextmanager
    def scope():
        yield

    with pytest.raises(DatasetLineError) as info:
        with scope():
            parse(b"[]\n")
    info.value.add_note("while uploading")
    assert info.value.__notes__ == ["while uploading"]
    assert_error(info.value, 1, "json", "got array")


# --- split_rows ----------------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_complete() -> None:
    rows = list(range(100))
    train, test = split_rows(rows, test_fraction=0.2, seed=7)
    assert (train, test) == split_rows(rows, test_fraction=0.2, seed=7)
    assert (len(train), len(test)) == (80, 20)
    assert set(train).isdisjoint(test) and sorted(train + test) == rows
    assert train == sorted(train) and test == sorted(test)  # file order is kept within each part
    assert split_rows(rows, test_fraction=0.2, seed=8)[1] != test


@pytest.mark.parametrize(
    ("n", "fraction", "sizes"),
    [(2, 0.01, (1, 1)), (2, 0.99, (1, 1)), (10, 0.001, (9, 1)), (10, 0.95, (1, 9)), (5, 0.0, (5, 0))],
)
def test_split_sizes_keep_a_row_on_each_side(n: int, fraction: float, sizes: tuple[int, int]) -> None:
    train, test = split_rows(list(range(n)), test_fraction=fraction, seed=0)
    assert (len(train), len(test)) == sizes


@pytest.mark.parametrize(
    ("n", "fraction", "phrase"),
    [
        (1, 0.5, "at least 2 rows"),
        (0, 0.1, "at least 2 rows"),
        (10, 1.0, "below 1"),
        (10, -0.1, "at least 0"),
        (10, float("nan"), "below 1"),
    ],
)
def test_split_rejects_impossible_requests(n: int, fraction: float, phrase: str) -> None:
    with pytest.raises(ValueError, match=phrase):
        split_rows(list(range(n)), test_fraction=fraction, seed=0)


# --- dump_jsonl and row_stats --------------------------------------------------------------------


def test_dump_round_trips_through_parse() -> None:
    source = jsonl(
        {"instruction": "Übersetze", "input": "日本", "output": "Japan 🇯🇵", "system": "s"},
        {"instruction": "a\u2028b", "output": "c"},
    )
    rows = parse(source).rows
    dumped = dump_jsonl(rows)
    assert dumped.endswith(b"\n") and dumped.count(b"\n") == 2
    assert "日本".encode() in dumped  # ensure_ascii=False keeps text readable
    assert json.loads(dumped.splitlines()[0]) == {"messages": rows[0]}
    again = parse(dumped)
    assert (again.format, again.rows) == (DatasetFormat.CHAT, rows)


def test_dump_empty_is_empty() -> None:
    assert dump_jsonl([]) == b""


def test_row_stats() -> None:
    rows = [
        [{"role": "user", "content": "abc"}, {"role": "assistant", "content": "de"}],
        [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": "1234"},
        ],
    ]
    assert row_stats(rows) == {"rows": 2, "messages": 5, "assistant_messages": 2, "chars": 11, "max_row_chars": 6}
    assert row_stats([]) == {"rows": 0, "messages": 0, "assistant_messages": 0, "chars": 0, "max_row_chars": 0}


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({"prompt": "a\u0000b", "completion": "c"}, "prompt"),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\u0000"}]},
            "messages[1].content",
        ),
    ],
)
def test_a_nul_character_is_refused_naming_line_and_field(row: dict[str, Any], field: str) -> None:
    """Postgres text cannot hold NUL, and an evaluation stores prompts and references: refused at upload."""
    good = json.dumps(
        {
            **row,
            **(
                {"prompt": "p"}
                if "prompt" in row
                else {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
            ),
        }
    ).encode()
    with pytest.raises(DatasetLineError) as info:
        parse_jsonl(good + b"\n" + json.dumps(row).encode() + b"\n", split="train", max_rows=10, max_line_bytes=10_000)
    assert info.value.line == 2 and info.value.field == field and "NUL" in info.value.message
