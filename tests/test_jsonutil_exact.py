"""``jsonutil.load_json_bounded`` at its exact limits: nesting depth (brackets inside strings, escaped
quotes and backslash runs, state carried across chunks), number length, overflow, NaN, duplicate keys;
and the error names the file and what was found. Every limit is tested on both sides."""

import pytest

from microcnn import jsonutil
from microcnn.errors import FileFormatError
from microcnn.jsonutil import MAX_JSON_DEPTH, MAX_NUMBER_CHARS, load_json_bounded


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_depth_limit_is_inclusive_and_the_error_reports_the_depth_found():
    assert load_json_bounded(nested(MAX_JSON_DEPTH), "f.json") == eval(nested(MAX_JSON_DEPTH))
    with pytest.raises(FileFormatError) as info:
        load_json_bounded(nested(MAX_JSON_DEPTH + 1), "f.json", "model header")
    err = info.value
    assert err.path == "f.json" and "model header" in err.what
    assert err.found == f"{MAX_JSON_DEPTH + 1} levels" and str(MAX_JSON_DEPTH) in err.expected


def test_depth_counts_objects_and_arrays_alike():
    text = '{"a": ' * 20 + "[" * (MAX_JSON_DEPTH - 19) + "]" * (MAX_JSON_DEPTH - 19) + "}" * 20
    with pytest.raises(FileFormatError, match="nested too deeply") as info:
        load_json_bounded(text, "f")
    assert info.value.found == f"{MAX_JSON_DEPTH + 1} levels"


def test_brackets_inside_strings_do_not_count():
    many = "[" * (3 * MAX_JSON_DEPTH)
    assert load_json_bounded(f'["{many}"]', "f") == [many]
    assert jsonutil._depth(f'["{many}"]'.encode()) == 1


@pytest.mark.parametrize(("slashes", "depth"), [(1, 1), (2, 2 * MAX_JSON_DEPTH + 1), (3, 1),
                                              (4, 2 * MAX_JSON_DEPTH + 1)])
def test_escaped_quotes_follow_the_parity_of_the_backslash_run(slashes, depth):
    """An odd run escapes the quote (the string goes on, its brackets do not count); an even run is
    escaped backslashes and the quote closes the string (the brackets after it count)."""
    inner = "[" * (2 * MAX_JSON_DEPTH)
    data = ('["x' + "\\" * slashes + '"' + inner).encode()
    assert jsonutil._depth(data) == depth


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7])
def test_depth_state_carries_across_chunks(monkeypatch, chunk):
    """Level, inside-a-string and the backslash run all cross chunk boundaries (tiny chunks here)."""
    text = ('["a\\\\\\"[[[", ' + '"\\\\"' + ", " + nested(MAX_JSON_DEPTH - 1) + "]").encode()
    whole = jsonutil._depth(text)
    assert whole == MAX_JSON_DEPTH
    monkeypatch.setattr(jsonutil, "_CHUNK", chunk)
    assert jsonutil._depth(text) == whole


def test_number_length_limit_is_inclusive():
    ok = "1" * MAX_NUMBER_CHARS
    assert load_json_bounded(f"[{ok}]", "f") == [int(ok)]
    assert load_json_bounded(f"[0.{'5' * (MAX_NUMBER_CHARS - 2)}]", "f") == [0.5555555555555556]
    with pytest.raises(FileFormatError, match=f"a number of {MAX_NUMBER_CHARS + 1} characters"):
        load_json_bounded(f"[{ok}1]", "f")
    with pytest.raises(FileFormatError, match="characters"):
        load_json_bounded(f"[0.{'5' * (MAX_NUMBER_CHARS - 1)}]", "f")


@pytest.mark.parametrize("text", ["[1e400]", "[-1e400]", "[NaN]", "[Infinity]", "[-Infinity]"])
def test_non_finite_numbers_are_refused(text):
    with pytest.raises(FileFormatError, match="refused"):
        load_json_bounded(text, "f")


def test_finite_extremes_are_kept():
    values = [1.7976931348623157e308, -5e-324, 0.0]
    assert load_json_bounded("[1.7976931348623157e308, -5e-324, 0.0]", "f") == values


def test_duplicate_keys_are_refused_at_any_level():
    with pytest.raises(FileFormatError, match="duplicate key 'a'"):
        load_json_bounded('{"a": 1, "b": 2, "a": 1}', "f")
    with pytest.raises(FileFormatError, match="duplicate key 'k'"):
        load_json_bounded('{"outer": [{"k": 1, "k": 2}]}', "f")
    with pytest.raises(FileFormatError, match="duplicate key 'b'"):  # the repeated key, not the first one
        load_json_bounded('{"a": 0, "b": 1, "c": 2, "b": 3}', "f")
    assert load_json_bounded('{"a": {"a": 1}, "b": [{"a": 2}]}', "f") == {"a": {"a": 1}, "b": [{"a": 2}]}


def test_bytes_and_text_give_the_same_result():
    text = '{"name": "caf\u00e9", "n": [1, 2.5, -3], "ok": true, "none": null}'
    assert load_json_bounded(text, "f") == load_json_bounded(text.encode(), "f") == {
        "name": "caf\u00e9", "n": [1, 2.5, -3], "ok": True, "none": None}


@pytest.mark.parametrize("data", [b'{"a": 1', b"\xff\xfe[1]", b"", b"[1,]"])
def test_invalid_json_is_a_file_format_error_naming_the_file(data):
    with pytest.raises(FileFormatError, match="not valid JSON") as info:
        load_json_bounded(data, "/data/model.json", "model header")
    assert info.value.path == "/data/model.json" and "model header" in str(info.value)


def test_depth_exactly_at_the_limit_is_accepted_when_there_are_more_brackets_than_the_limit():
    """More than MAX_JSON_DEPTH brackets in all (so the full scan runs), but only MAX_JSON_DEPTH deep."""
    text = "[" + nested(MAX_JSON_DEPTH - 1) + ", []]"
    assert jsonutil._depth(text.encode()) == MAX_JSON_DEPTH
    assert load_json_bounded(text, "f")[1] == []


def test_closing_brackets_lower_the_depth():
    """Many shallow siblings: hundreds of brackets, depth 2."""
    text = "[" + ", ".join(["[]"] * 200) + ", {}" * 50 + "]"
    assert jsonutil._depth(text.encode()) == 2
    assert len(load_json_bounded(text, "f")) == 250


def test_the_limits_are_the_documented_ones():
    """docs/robustness.md promises nesting <= 32 and number literals <= 40 characters: the numbers
    themselves, not whatever the constants say."""
    deep = "[" + "[" * 31 + "]" * 31 + ", []]"  # 32 deep, more than 32 brackets: the full scan runs
    assert load_json_bounded(deep, "f")[1] == []
    with pytest.raises(FileFormatError, match="nested too deeply"):
        load_json_bounded("[" + deep + "]", "f")
    assert load_json_bounded("[" + "9" * 40 + "]", "f") == [int("9" * 40)]
    with pytest.raises(FileFormatError, match="a number of 41 characters"):
        load_json_bounded("[" + "9" * 41 + "]", "f")
