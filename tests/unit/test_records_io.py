"""Records round-trip and validate; JSONL IO reports file+line; writes are atomic."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from megatron_selfreward import io as msio
from megatron_selfreward.io import (
    JsonlError,
    RecordReader,
    Records,
    atomic_write_json,
    atomic_write_text,
    concat_jsonl,
    count_records,
    iter_jsonl,
    iter_records_at,
    read_jsonl,
    read_records,
    sha256_file,
    write_jsonl,
)
from megatron_selfreward.records import (
    Judgement,
    PreferencePair,
    Prompt,
    RankedPrompt,
    RecordError,
    Response,
    SFTExample,
)

PROMPT = Prompt("p1", "How do I boil an egg?", "ift", {"oasst_id": "abc"})
RESPONSE = Response("p1", "p1-r0", "Put it in boiling water.", 6, "stop")
JUDGEMENT = Judgement("p1", "p1-r0", [4.0, None, 5.0], ["Score: 4", "dunno", "Score: 5"], [None, "missing", None], 4.5)
PAIR = PreferencePair("p1", "How do I boil an egg?", "good", "bad", 4.5, 2.0, "p1-r0", "p1-r3")
SFT = SFTExample([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
RANKED = RankedPrompt("e1", "Explain tides.", ["a", "b", "c"], [1, 0, 2])

ALL_RECORDS = [PROMPT, RESPONSE, JUDGEMENT, PAIR, SFT, RANKED]


# --------------------------------------------------------------------- records


@pytest.mark.parametrize("record", ALL_RECORDS, ids=lambda r: type(r).__name__)
def test_records_round_trip_through_json(record):
    d = json.loads(json.dumps(record.to_dict()))
    assert type(record).from_dict(d, where="x") == record


def test_records_to_dict_is_a_copy():
    d = PROMPT.to_dict()
    d["meta"]["oasst_id"] = "changed"
    assert PROMPT.meta["oasst_id"] == "abc"


def test_records_are_frozen():
    with pytest.raises(Exception):
        PROMPT.text = "other"  # type: ignore[misc]


def test_records_optional_fields_default():
    p = Prompt.from_dict({"prompt_id": "p", "text": "t"}, where="w")
    assert p.source == "" and p.meta == {}
    pair = PreferencePair.from_dict(
        {"prompt_id": "p", "prompt": "t", "chosen": "a", "rejected": "b", "chosen_score": 5, "rejected_score": 1}, "w"
    )
    assert pair.chosen_score == 5.0 and isinstance(pair.chosen_score, float)
    assert pair.chosen_response_id is None


def test_records_error_names_where_and_field_for_wrong_type():
    with pytest.raises(RecordError) as exc:
        SFTExample.from_dict({"messages": "hi"}, where="ift.jsonl line 7")
    assert str(exc.value) == "ift.jsonl line 7: field 'messages' must be a list, got str"


def test_records_error_for_missing_field():
    with pytest.raises(RecordError, match=r"^prompts.jsonl line 3: field 'text' is missing$"):
        Prompt.from_dict({"prompt_id": "p"}, where="prompts.jsonl line 3")


def test_records_error_for_unknown_field():
    with pytest.raises(RecordError, match=r"w: field 'txt' is not a field of Prompt"):
        Prompt.from_dict({"prompt_id": "p", "text": "t", "txt": "typo"}, where="w")


def test_records_error_for_non_object():
    with pytest.raises(RecordError, match=r"^w: Prompt record must be a JSON object, got list$"):
        Prompt.from_dict([1, 2], where="w")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "cls, d, field",
    [
        (Prompt, {"prompt_id": "", "text": "t"}, "prompt_id"),
        (Prompt, {"prompt_id": 3, "text": "t"}, "prompt_id"),
        (Response, {"prompt_id": "p", "response_id": "r", "text": "", "num_tokens": -1, "finish_reason": "stop"}, "num_tokens"),
        (Response, {"prompt_id": "p", "response_id": "r", "text": "", "num_tokens": True, "finish_reason": "stop"}, "num_tokens"),
        (Response, {"prompt_id": "p", "response_id": "r", "text": "", "num_tokens": 1.5, "finish_reason": "stop"}, "num_tokens"),
        (SFTExample, {"messages": []}, "messages"),
        (SFTExample, {"messages": [{"role": "user", "content": "q"}]}, "messages"),
        (SFTExample, {"messages": [{"role": "bot", "content": "a"}]}, "messages[0].role"),
        (SFTExample, {"messages": [{"role": "assistant"}]}, "messages[0]"),
        (SFTExample, {"messages": [{"role": "assistant", "content": 5}]}, "messages[0].content"),
        (SFTExample, {"messages": ["hi"]}, "messages[0]"),
        (RankedPrompt, {"prompt_id": "e", "prompt": "q", "responses": ["a"], "human_ranks": [0]}, "responses"),
        (RankedPrompt, {"prompt_id": "e", "prompt": "q", "responses": ["a", "b"], "human_ranks": [0]}, "human_ranks"),
        (RankedPrompt, {"prompt_id": "e", "prompt": "q", "responses": ["a", "b"], "human_ranks": [0, 2]}, "human_ranks"),
        (RankedPrompt, {"prompt_id": "e", "prompt": "q", "responses": ["a", "b"], "human_ranks": [0, 0]}, "human_ranks"),
        (RankedPrompt, {"prompt_id": "e", "prompt": "q", "responses": ["a", "b"], "human_ranks": [0, "1"]}, "human_ranks[1]"),
        (PreferencePair, {"prompt_id": "p", "prompt": "q", "chosen": "a", "rejected": "b", "chosen_score": 3, "rejected_score": 3}, "chosen_score"),
        (PreferencePair, {"prompt_id": "p", "prompt": "q", "chosen": "a", "rejected": "b", "chosen_score": float("nan"), "rejected_score": 3}, "chosen_score"),
    ],
)
def test_records_invalid_values_name_the_field(cls, d, field):
    with pytest.raises(RecordError) as exc:
        cls.from_dict(d, where="f.jsonl line 2")
    assert exc.value.where == "f.jsonl line 2"
    assert exc.value.field_name == field
    assert str(exc.value).startswith(f"f.jsonl line 2: field '{field}' ")


def _judgement(**overrides):
    d = JUDGEMENT.to_dict()
    d.update(overrides)
    return d


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"sample_scores": [4.0, None]}, "sample_scores"),  # length mismatch
        ({"sample_scores": [4.0, 3.0, 5.0]}, "failure_reasons[1]"),  # scored sample with a reason
        ({"failure_reasons": [None, None, None]}, "failure_reasons[1]"),  # failed sample without a reason
        ({"mean_score": 4.0}, "mean_score"),  # not the mean of [4, 5]
        ({"mean_score": None}, "mean_score"),
        ({"sample_scores": [4.0, "x", 5.0]}, "sample_scores[1]"),
        ({"sample_scores": [True, None, 5.0]}, "sample_scores[0]"),
        ({"raw_outputs": ["a", 1, "b"]}, "raw_outputs[1]"),
    ],
)
def test_judgement_consistency_checks(overrides, field):
    with pytest.raises(RecordError) as exc:
        Judgement.from_dict(_judgement(**overrides), where="judgements.jsonl line 9")
    assert exc.value.field_name == field
    assert "judgements.jsonl line 9" in str(exc.value)


def test_judgement_all_failed_has_null_mean():
    j = Judgement("p", "r", [None], ["garbage"], ["missing"], None)
    assert j.num_failed == 1 and j.mean_score is None
    with pytest.raises(RecordError, match="mean_score"):
        Judgement("p", "r", [None], ["garbage"], ["missing"], 0.0)


def test_judgement_int_scores_become_floats():
    j = Judgement.from_dict(_judgement(sample_scores=[4, None, 5], mean_score=4.5), "w")
    assert j.sample_scores == [4.0, None, 5.0]
    assert all(isinstance(s, float) for s in j.sample_scores if s is not None)


def test_records_direct_construction_is_validated_too():
    with pytest.raises(RecordError, match=r"^Response: field 'finish_reason'"):
        Response("p", "r", "t", 1, "")


# ------------------------------------------------------------------------- io


def test_write_and_read_jsonl_round_trip(tmp_path: Path):
    path = tmp_path / "out" / "prompts.jsonl"
    n = write_jsonl(path, [PROMPT, {"plain": "dict", "ü": "ß"}])
    assert n == 2
    rows = read_jsonl(path)
    assert rows == [PROMPT.to_dict(), {"plain": "dict", "ü": "ß"}]
    # UTF-8 stored as is, not \u escapes: files stay greppable.
    assert "ß" in path.read_text(encoding="utf-8")


def test_write_jsonl_streams_a_generator(tmp_path: Path):
    path = tmp_path / "r.jsonl"
    assert write_jsonl(path, ({"i": i} for i in range(5))) == 5
    assert [d["i"] for d in iter_jsonl(path)] == [0, 1, 2, 3, 4]


def test_write_jsonl_empty(tmp_path: Path):
    path = tmp_path / "empty.jsonl"
    assert write_jsonl(path, []) == 0
    assert path.read_bytes() == b"" and read_jsonl(path) == []


def test_read_jsonl_skips_blank_lines_and_crlf(tmp_path: Path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\r\n\r\n   \n{"a": 2}\n\n')
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]


def test_read_jsonl_malformed_line_names_file_and_line(tmp_path: Path):
    path = tmp_path / "ift.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2,}\n{"a": 3}\n', encoding="utf-8")
    with pytest.raises(JsonlError) as exc:
        read_jsonl(path)
    assert exc.value.line_no == 3  # 1-based, blank line 2 still counted
    assert exc.value.path == str(path)
    assert str(exc.value).startswith(f"{path} line 3: invalid JSON: ")
    assert "column" in str(exc.value)


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_read_jsonl_cut_off_record_points_at_the_open_string(tmp_path: Path, newline: str):
    # The string opens at column 43; parsing the line's newline reports column 57, the newline.
    path = tmp_path / "ift.jsonl"
    cut = '{"messages": [{"role": "user", "content": "half a record'
    path.write_text(f'{{"a": 1}}{newline}{cut}{newline}{{"a": 3}}{newline}', encoding="utf-8", newline="")
    with pytest.raises(JsonlError) as exc:
        read_jsonl(path)
    assert str(exc.value) == f"{path} line 2: invalid JSON: Unterminated string starting at (column 43)"


def test_read_jsonl_rejects_non_object_lines(tmp_path: Path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(JsonlError, match=r"line 2: expected a JSON object, got list"):
        read_jsonl(path)


def test_read_jsonl_bad_utf8_names_line(tmp_path: Path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n')
    with pytest.raises(JsonlError, match=r"line 2: not valid UTF-8"):
        read_jsonl(path)


def test_iter_jsonl_yields_good_lines_before_the_bad_one(tmp_path: Path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\nnot json\n', encoding="utf-8")
    it = iter_jsonl(path)
    assert next(it) == {"a": 1}
    with pytest.raises(JsonlError, match="line 2"):
        next(it)


def test_jsonl_gz_round_trip_and_deterministic(tmp_path: Path):
    a, b = tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.gz"
    rows = [{"i": i, "text": "x" * i} for i in range(50)]
    write_jsonl(a, rows)
    write_jsonl(b, rows)
    assert gzip.decompress(a.read_bytes()).startswith(b'{"i": 0')
    assert read_jsonl(a) == rows
    assert sha256_file(a) == sha256_file(b)  # mtime=0 in the gzip header


def test_jsonl_gz_reads_externally_written_file(tmp_path: Path):
    path = tmp_path / "x.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write('{"a": 1}\n{"a": oops}\n')
    with pytest.raises(JsonlError, match=r"x.jsonl.gz line 2: invalid JSON"):
        read_jsonl(path)


def test_jsonl_gz_truncated_is_a_jsonl_error(tmp_path: Path):
    path = tmp_path / "x.jsonl.gz"
    write_jsonl(path, [{"i": i, "pad": "y" * 100} for i in range(200)])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(JsonlError, match=r"x.jsonl.gz line \d+: cannot read file"):
        read_jsonl(path)


def test_read_jsonl_missing_file_is_file_not_found(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        read_jsonl(tmp_path / "nope.jsonl")


def test_read_records_builds_records_and_locates_errors(tmp_path: Path):
    path = tmp_path / "responses.jsonl"
    write_jsonl(path, [RESPONSE, RESPONSE])
    assert read_records(path, Response) == [RESPONSE, RESPONSE]
    bad = RESPONSE.to_dict()
    del bad["num_tokens"]
    write_jsonl(path, [RESPONSE, bad])
    with pytest.raises(RecordError, match=rf"^{path} line 2: field 'num_tokens' is missing$"):
        read_records(path, Response)


# ------------------------------------------------------------- streamed reading


def _responses(n: int) -> list[Response]:
    return [Response(f"p{i // 4}", f"p{i // 4}-r{i % 4}", f"answer {i} ü\n" * (i % 5), i, "stop")
            for i in range(n)]


@pytest.mark.parametrize("out_name", ["all.jsonl", "all.jsonl.gz"])
def test_concat_jsonl_is_write_jsonl_of_all_records_byte_for_byte(tmp_path: Path, out_name: str):
    records = _responses(23)
    parts = [tmp_path / f"shard_{i}.jsonl" for i in range(4)]
    for i, part in enumerate(parts):
        write_jsonl(part, records[i * 7:(i + 1) * 7])  # the last part is empty
    assert concat_jsonl(parts, tmp_path / out_name, Response) == 23
    write_jsonl(tmp_path / f"ref_{out_name}", records)
    assert (tmp_path / out_name).read_bytes() == (tmp_path / f"ref_{out_name}").read_bytes()


def test_concat_jsonl_normalises_line_endings_bom_and_blank_lines(tmp_path: Path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_bytes(b'\xef\xbb\xbf{"a": 1}\r\n\n   \n{"a": 2}')  # no newline at the end
    b.write_bytes(b'{"a": 3}\n')
    assert concat_jsonl([a, b], tmp_path / "out.jsonl") == 3
    assert (tmp_path / "out.jsonl").read_bytes() == b'{"a": 1}\n{"a": 2}\n{"a": 3}\n'


def test_concat_jsonl_names_the_bad_source_line_and_writes_nothing(tmp_path: Path):
    good, bad, out = tmp_path / "good.jsonl", tmp_path / "bad.jsonl", tmp_path / "out.jsonl"
    write_jsonl(good, _responses(3))
    bad.write_text('{"a": 1}\n{"a": \n', encoding="utf-8")
    with pytest.raises(JsonlError, match=rf"^{bad} line 2: invalid JSON"):
        concat_jsonl([good, bad], out)
    broken = RESPONSE.to_dict()
    del broken["text"]
    write_jsonl(bad, [RESPONSE, broken])
    with pytest.raises(RecordError, match=rf"^{bad} line 2: field 'text' is missing$"):
        concat_jsonl([good, bad], out, Response)
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "good.jsonl"]  # no output, no temp file


@pytest.mark.parametrize("name", ["responses.jsonl", "responses.jsonl.gz"])
def test_records_are_read_back_by_their_offsets_in_any_order(tmp_path: Path, name: str):
    path = tmp_path / name
    records = _responses(30)
    write_jsonl(path, records)
    located = list(iter_records_at(path, Response))
    assert [r for _, _, r in located] == records
    assert [line_no for line_no, _, _ in located] == list(range(1, 31))
    with RecordReader(path, Response) as reader:
        for line_no, offset, record in located[::3] + located[::-7]:  # forwards, then backwards
            assert reader.at(offset, line_no) == record


def test_record_reader_names_file_and_line(tmp_path: Path):
    path = tmp_path / "responses.jsonl"
    write_jsonl(path, [RESPONSE, {"prompt_id": "p1"}])
    offset = len((json.dumps(RESPONSE.to_dict(), ensure_ascii=False) + "\n").encode())
    with RecordReader(path, Response) as reader, pytest.raises(RecordError, match=rf"^{path} line 2: "):
        reader.at(offset, 2)


def test_records_view_streams_counts_and_compares(tmp_path: Path):
    path = tmp_path / "responses.jsonl"
    records = _responses(9)
    write_jsonl(path, records)
    view = Records(path, Response)
    assert len(view) == 9 and list(view) == records and list(view) == records  # iterable again
    assert view == records and records == view and view == Records(path, Response, 9)
    assert view != records[:-1] and view != records[::-1] and view != "not records"
    assert len(Records(path, Response, count=5)) == 5  # a given count is trusted, not re-read
    assert repr(view).startswith("Records(") and "Response" in repr(view)


def test_count_records_parses_every_line(tmp_path: Path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n', encoding="utf-8")
    assert count_records(path) == 2
    path.write_text('{"a": 1}\nnot json\n', encoding="utf-8")
    with pytest.raises(JsonlError, match="line 2"):
        count_records(path)


def test_atomic_write_text_and_json(tmp_path: Path):
    path = tmp_path / "sub" / "manifest.json"
    atomic_write_json(path, {"b": 1, "a": [1, 2], "name": "ü"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"b": 1, "a": [1, 2], "name": "ü"}
    assert path.read_text(encoding="utf-8").endswith("}\n")
    assert list(json.loads(path.read_text(encoding="utf-8"))) == ["b", "a", "name"]  # order kept
    atomic_write_text(path, "replaced")
    assert path.read_text(encoding="utf-8") == "replaced"
    assert os.listdir(path.parent) == ["manifest.json"]  # no temp files left


def test_atomic_write_failure_keeps_old_content_and_no_temp(tmp_path: Path):
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, [{"old": True}])

    def records():
        yield {"new": 1}
        raise RuntimeError("generator died mid-write")

    with pytest.raises(RuntimeError, match="mid-write"):
        write_jsonl(path, records())
    assert read_jsonl(path) == [{"old": True}]
    assert os.listdir(tmp_path) == ["pairs.jsonl"]


def test_atomic_write_unserialisable_keeps_old_content(tmp_path: Path):
    path = tmp_path / "m.json"
    atomic_write_json(path, {"v": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"v": object()})
    with pytest.raises(TypeError):
        write_jsonl(tmp_path / "m.jsonl", [{"ok": 1}, {"v": object()}])
    assert json.loads(path.read_text()) == {"v": 1}
    assert sorted(os.listdir(tmp_path)) == ["m.json"]


def test_atomic_write_crash_in_replace_cleans_temp(tmp_path: Path, monkeypatch):
    path = tmp_path / "x.txt"
    atomic_write_text(path, "old")

    def boom(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(msio.os, "replace", boom)
    with pytest.raises(OSError, match="disk on fire"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["x.txt"]


def test_atomic_write_fsyncs_before_rename(tmp_path: Path, monkeypatch):
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(msio.os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(msio.os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    atomic_write_text(tmp_path / "f", "data")
    assert calls[:2] == ["fsync", "replace"]


def test_sha256_file(tmp_path: Path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    assert sha256_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert sha256_file(path, chunk_bytes=1) == sha256_file(path)
