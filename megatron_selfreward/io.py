"""File IO for stages: atomic writes, JSONL read/write, content hashes.

Two promises the pipeline is built on:
- nothing is ever half written: every write goes to a temp file in the same
  directory, is flushed and fsync'ed, then renamed over the target with
  ``os.replace`` (atomic on POSIX), so a crash leaves the old file or the new
  one, never a torn one;
- a bad input line is reported as ``<file> line <n>: <problem>`` so it can be
  found by a human without a debugger.

``.gz`` paths are read and written gzip-compressed.

Stage files grow to hundreds of thousands of records at paper scale, so reading is streamed:
``iter_records`` yields one record at a time, ``Records`` stands for a file's records without
holding them, ``iter_records_at`` gives each record's byte offset so that ``RecordReader`` can
fetch a few of them back later, and ``concat_jsonl`` joins files line by line.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tempfile
import zlib
from pathlib import Path
from typing import IO, Any, Generic, Iterable, Iterator, Protocol, Sequence, TypeVar

__all__ = [
    "JsonlError",
    "atomic_write_text",
    "atomic_write_json",
    "write_jsonl",
    "iter_jsonl",
    "read_jsonl",
    "iter_records",
    "iter_records_at",
    "read_records",
    "count_records",
    "Records",
    "RecordReader",
    "concat_jsonl",
    "sha256_file",
]

PathLike = str | os.PathLike


class JsonlError(ValueError):
    """A JSONL file could not be read; names the file and the 1-based line."""

    def __init__(self, path: PathLike, line_no: int | None, problem: str) -> None:
        self.path = str(path)
        self.line_no = line_no
        self.problem = problem
        loc = self.path if line_no is None else f"{self.path} line {line_no}"
        super().__init__(f"{loc}: {problem}")


class _FromDict(Protocol):
    @classmethod
    def from_dict(cls, d: Any, where: str) -> Any: ...


T = TypeVar("T", bound=_FromDict)


def fsync_path(path: Path) -> None:
    """Flush a file or a directory to disk (a rename lives in its directory's entry; without
    this a power loss can forget it). Not every platform/filesystem allows opening a directory:
    then nothing happens."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: PathLike, write_body: Any) -> None:
    """Run ``write_body(binary_file)`` into a temp file, then atomically rename."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Same directory as the target: os.replace is only atomic within one filesystem.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        # mkstemp creates 0600; outputs are shared on clusters, so use the umask like open() does.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as raw:
            write_body(raw)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        # Includes KeyboardInterrupt: a killed stage must not leave debris
        # that a later glob could mistake for output.
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    fsync_path(target.parent)


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    """Replace ``path`` with ``text`` atomically."""
    data = text.encode(encoding)
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """Replace ``path`` with pretty-printed JSON (key order kept, UTF-8, trailing newline)."""
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    atomic_write_text(path, text)


def _to_json_obj(record: Any) -> Any:
    to_dict = getattr(record, "to_dict", None)
    return to_dict() if callable(to_dict) else record


def _write_lines(path: PathLike, lines: Iterable[bytes]) -> int:
    """Atomically write each of `lines` plus a newline (gzip for .gz); returns the count."""
    count = 0

    def body(raw: IO[bytes]) -> None:
        nonlocal count
        # mtime=0 keeps .gz output byte-identical across reruns, so content
        # hashes in manifests stay stable.
        out: IO[bytes] = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) if _is_gz(path) else raw
        try:
            for line in lines:
                out.write(line)
                out.write(b"\n")
                count += 1
        finally:
            if out is not raw:
                out.close()  # writes the gzip trailer; leaves `raw` open

    _atomic_write(path, body)
    return count


def write_jsonl(path: PathLike, records: Iterable[Any]) -> int:
    """Atomically write one JSON object per line; returns the number of lines.

    Accepts dicts or records with ``to_dict()``. Streams, so the records may
    be a generator larger than memory.
    """
    return _write_lines(path, (json.dumps(_to_json_obj(record), ensure_ascii=False).encode("utf-8")
                               for record in records))


def _is_gz(path: PathLike) -> bool:
    return str(path).endswith(".gz")


def _open_read(path: PathLike) -> IO[bytes]:
    return gzip.open(path, "rb") if _is_gz(path) else open(path, "rb")  # type: ignore[return-value]


def _iter_lines(path: PathLike) -> Iterator[tuple[int, int, bytes]]:
    """(1-based line number, byte offset, raw line) of every line; for .gz the offset is in the
    uncompressed stream, which is what GzipFile.seek takes."""
    line_no, offset = 0, 0
    try:
        with _open_read(path) as f:
            for line_no, raw in enumerate(f, start=1):
                yield line_no, offset, raw
                offset += len(raw)
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        # A truncated or corrupt .gz fails mid-iteration; say how far we got.
        raise JsonlError(path, line_no + 1, f"cannot read file: truncated or corrupt gzip data ({err})") from err


def iter_jsonl_numbered(path: PathLike) -> Iterator[tuple[int, dict]]:
    """Yield (1-based line number, object) for each non-blank line."""
    for line_no, _, raw in _iter_lines(path):
        obj = _parse_line(path, line_no, raw)
        if obj is not None:
            yield line_no, obj


def _parse_line(path: PathLike, line_no: int, raw: bytes) -> dict | None:
    try:
        # utf-8-sig on line 1 tolerates a BOM from Windows editors.
        text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
    except UnicodeDecodeError as err:
        raise JsonlError(path, line_no, f"not valid UTF-8: {err}") from None
    if not text.strip():
        return None
    # The line terminator is not part of the record: parsed, it turns a cut-off string into
    # "invalid control character" at the newline's column instead of where the string starts.
    text = text.removesuffix("\n").removesuffix("\r")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise JsonlError(path, line_no, f"invalid JSON: {err.msg} (column {err.colno})") from None
    if not isinstance(obj, dict):
        raise JsonlError(path, line_no, f"expected a JSON object, got {type(obj).__name__}")
    return obj


def iter_jsonl(path: PathLike) -> Iterator[dict]:
    """Yield each JSON object; blank lines are skipped. Raises JsonlError."""
    for _, obj in iter_jsonl_numbered(path):
        yield obj


def read_jsonl(path: PathLike) -> list[dict]:
    """All JSON objects of a JSONL(.gz) file. Raises JsonlError."""
    return list(iter_jsonl(path))


def iter_records(path: PathLike, cls: type[T]) -> Iterator[T]:
    """Yield ``cls.from_dict`` of each line; errors name ``<path> line <n>``."""
    for line_no, obj in iter_jsonl_numbered(path):
        yield cls.from_dict(obj, where=f"{path} line {line_no}")


def read_records(path: PathLike, cls: type[T]) -> list[T]:
    """All records of a JSONL(.gz) file as ``cls`` instances."""
    return list(iter_records(path, cls))


def iter_records_at(path: PathLike, cls: type[T]) -> Iterator[tuple[int, int, T]]:
    """(line number, byte offset, record) of each line; ``RecordReader`` reads one back by its
    offset, so a pass can remember where the records it needs later are instead of holding them."""
    for line_no, offset, raw in _iter_lines(path):
        obj = _parse_line(path, line_no, raw)
        if obj is not None:
            yield line_no, offset, cls.from_dict(obj, where=f"{path} line {line_no}")


def count_records(path: PathLike) -> int:
    """How many JSON objects the file holds (each line parsed, so a malformed one still raises)."""
    return sum(1 for _ in iter_jsonl_numbered(path))


class RecordReader(Generic[T]):
    """Single records of a JSONL(.gz) file, read back by the offsets ``iter_records_at`` gave.

    One open handle for many reads. Reading in file order costs one pass over the file; a .gz
    file seeks backwards by decompressing again from its start, so read those in order.
    """

    def __init__(self, path: PathLike, cls: type[T]) -> None:
        self.path, self.cls = path, cls
        self._file = _open_read(path)

    def at(self, offset: int, line_no: int) -> T:
        try:
            if self._file.tell() != offset:
                self._file.seek(offset)
            raw = self._file.readline()
        except (gzip.BadGzipFile, EOFError, zlib.error) as err:
            raise JsonlError(self.path, line_no,
                             f"cannot read file: truncated or corrupt gzip data ({err})") from err
        obj = _parse_line(self.path, line_no, raw)
        if obj is None:
            raise JsonlError(self.path, line_no,
                             "expected a record at this line: the file changed while it was read")
        return self.cls.from_dict(obj, where=f"{self.path} line {line_no}")

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "RecordReader[T]":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Records(Generic[T]):
    """The records of a JSONL(.gz) file without holding them in memory.

    Iterating reads the file again, one record at a time; ``len()`` is the count given when the
    file was written, else counted once. Equality compares record by record (also with a list),
    streaming both sides. Stages return this where a list of every record may not fit in memory.
    """

    def __init__(self, path: PathLike, cls: type[T], count: int | None = None) -> None:
        self.path, self.cls, self._count = Path(path), cls, count

    def __iter__(self) -> Iterator[T]:
        return iter_records(self.path, self.cls)

    def __len__(self) -> int:
        if self._count is None:
            self._count = count_records(self.path)
        return self._count

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, (Records, list, tuple)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]  # equal by content, which can change on disk

    def __repr__(self) -> str:
        return f"Records({str(self.path)!r}, {self.cls.__name__}, count={self._count})"


def concat_jsonl(sources: Sequence[PathLike], out: PathLike, cls: type[_FromDict] | None = None) -> int:
    """Atomically write every line of ``sources``, in order, to ``out``; returns the record count.

    Streamed line by line: each line is parsed (and built as ``cls`` when given), so a bad line
    fails with its file and line number, then copied as it is (a BOM, blank lines and CR before
    the newline dropped). For files written by ``write_jsonl`` the result is byte for byte what
    ``write_jsonl`` of all their records writes, without encoding them again.
    """

    def lines() -> Iterator[bytes]:
        for source in sources:
            for line_no, _, raw in _iter_lines(source):
                obj = _parse_line(source, line_no, raw)
                if obj is None:
                    continue
                if cls is not None:
                    cls.from_dict(obj, where=f"{source} line {line_no}")
                if line_no == 1:
                    raw = raw.removeprefix(b"\xef\xbb\xbf")
                yield raw.rstrip(b"\r\n")

    return _write_lines(out, lines())


def sha256_file(path: PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of the file's bytes (as stored, i.e. compressed for .gz)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()
