"""Label files held as columns: one Arrow string array per header name, rows made on demand.

A dict per CSV row cost about ten times the file's size in Python objects (ChestX-ray14's
112,120 rows: +130 MB); Arrow's CSV reader keeps the same values in little more than the
file's size. Adapters still loop over ``(line, row)`` pairs: :class:`Table` yields them
lazily, turning into Python strings only the columns a loop reads, ``BLOCK`` rows at a time.

pyarrow is imported where a file is read, so that importing the data layer stays light.
"""

from __future__ import annotations

import array
import csv
import gzip
import io
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa

BLOCK = 4096  # rows turned into Python strings at a time while iterating
FLUSH = 65536  # rows the csv-module path holds as Python strings before making Arrow arrays
BOM = b"\xef\xbb\xbf"
# What str.strip() removes (every c with c.isspace()), so that Arrow's trim matches it.
WHITESPACE = "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) \
    + "\u2028\u2029\u202f\u205f\u3000"
_CHUNK = 1 << 20  # bytes compared at a time when locating line breaks and quotes
WHOLE_BYTES = 1 << 22  # label files up to this size (uncompressed) are parsed from memory


class _Block(dict):
    """Python strings of rows ``[start, start + size)``, one list per column read so far."""

    __slots__ = ("columns", "start", "size")

    def __init__(self, columns: dict[str, pa.ChunkedArray], start: int, size: int) -> None:
        super().__init__()
        self.columns, self.start, self.size = columns, start, size

    def __missing__(self, name: str) -> list[str]:
        values = self[name] = self.columns[name].slice(self.start, self.size).to_pylist()
        return values


class Row(Mapping[str, str]):
    """One record as a read-only mapping from header name to its stripped value."""

    __slots__ = ("_block", "_i")

    def __init__(self, block: _Block, i: int) -> None:
        self._block, self._i = block, i

    def __getitem__(self, name: str) -> str:
        return self._block[name][self._i]

    def __iter__(self) -> Iterator[str]:
        return iter(self._block.columns)

    def __len__(self) -> int:
        return len(self._block.columns)

    def __repr__(self) -> str:
        return f"Row({dict(self)!r})"


class Table:
    """The records of a label file, column by column.

    Iterating yields ``(line, row)``: ``line`` is the 1-based line the record ends on (as
    ``csv.reader.line_num`` counts), ``row`` a :class:`Row`. ``columns`` maps each header name
    to its Arrow string array (a repeated name to its last column, as ``dict(zip(...))`` did);
    ``lines`` holds the line numbers.
    """

    def __init__(self, header: list[str], columns: list[pa.ChunkedArray], lines: np.ndarray) -> None:
        self.columns: dict[str, pa.ChunkedArray] = dict(zip(header, columns, strict=True))
        self.lines = lines

    def __len__(self) -> int:
        return len(self.lines)

    def __iter__(self) -> Iterator[tuple[int, Row]]:
        for start in range(0, len(self), BLOCK):
            block = _Block(self.columns, start, BLOCK)
            for i, line in enumerate(self.lines[start:start + BLOCK].tolist()):
                yield line, Row(block, i)

    def __getitem__(self, i: int) -> tuple[int, Row]:
        i = range(len(self))[i]  # negative indices count from the end; IndexError past it
        return int(self.lines[i]), Row(_Block(self.columns, i, 1), 0)


class TableBuilder:
    """A :class:`Table` from rows of Python strings (the csv-module path), made in batches."""

    def __init__(self, header: list[str]) -> None:
        self.header = header
        self._rows: list[list[str]] = []
        self._lines = array.array("q")
        self._chunks: list[list[pa.Array]] = [[] for _ in header]

    def append(self, line: int, values: list[str]) -> None:
        self._rows.append(values)
        self._lines.append(line)
        if len(self._rows) == FLUSH:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa  # noqa: PLC0415 - only reading a label file pays for pyarrow

        for j, chunks in enumerate(self._chunks):
            chunks.append(pa.array([r[j] for r in self._rows], pa.string()))
        self._rows = []

    def finish(self) -> Table:
        import pyarrow as pa  # noqa: PLC0415 - only reading a label file pays for pyarrow

        self._flush()
        columns = [pa.chunked_array(c, pa.string()) for c in self._chunks]
        return Table(self.header, columns, np.frombuffer(self._lines, dtype=np.int64))


def read_columns(path: Path, delimiter: str) -> tuple[list[str], Table] | None:
    """A CSV file (optionally gzipped) as ``(header, table)``, read by Arrow as csv would read it.

    Values and header names are stripped; blank lines are skipped. Returns None where Python's
    csv module must read the file instead: a delimiter Arrow does not take, quoting the two
    might read differently, no header on the first line, or any record Arrow refuses (a field
    count unlike the header's, bytes that are not UTF-8), so that the csv-module path names
    the line at fault, or accepts extra empty trailing fields as it always has.

    Raises:
        UnicodeDecodeError: The header is not UTF-8.
    """
    import pyarrow as pa  # noqa: PLC0415 - only reading a label file pays for pyarrow
    import pyarrow.compute as pc  # noqa: PLC0415 - as above
    import pyarrow.csv as pacsv  # noqa: PLC0415 - as above

    sep = delimiter.encode()
    if len(sep) != 1 or sep in b'"\r\n':
        return None
    with io.TextIOWrapper(_open(path), encoding="utf-8-sig", newline="") as text:
        fields = next(csv.reader(text, delimiter=delimiter), [])
    if not fields:
        return None
    names = [str(i) for i in range(len(fields))]
    pool = _pool()
    with _open(path) as f:
        stream = _Scanned(f)
        # A small file is parsed from memory; a larger one streams through Python in Arrow's
        # blocks, never whole in memory (each block is a hop to Arrow's I/O thread and back).
        source = pa.BufferReader(stream.head) if stream.whole else pa.PythonFile(stream, mode="r")
        try:
            # The header record is read as row 0 so that every column is typed as a string.
            table = pacsv.read_csv(
                source,
                read_options=pacsv.ReadOptions(column_names=names, use_threads=False),
                parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
                convert_options=pacsv.ConvertOptions(column_types=dict.fromkeys(names, pa.string())),
                memory_pool=pool,
            )
        except pa.ArrowInvalid:
            return None
    if stream.plain and stream.newlines + (stream.last != b"\n") == table.num_rows:
        lines = np.arange(1, table.num_rows + 1)  # one record per line, none blank
    else:
        with _open(path) as f:
            raw = f.read()
        lines = record_lines(np.frombuffer(raw, np.uint8, offset=len(BOM) * raw.startswith(BOM)), sep[0])
        if lines is None or len(lines) != table.num_rows:
            return None
    columns = []
    for col in table.slice(1).columns:
        columns.append(pc.utf8_trim(col, WHITESPACE, memory_pool=pool) if _may_need_strip(col) else col)
    header = [h.strip() for h in fields]
    return header, Table(header, columns, lines[1:])


class _Scanned:
    """A binary stream that notes, as it is read, whether its lines can simply be counted.

    Its first ``WHOLE_BYTES`` are read at once: ``whole`` says whether that was all of it.
    """

    closed = False

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.newlines, self.last = 0, b""
        self.plain = True  # no quote, no \r: one record per line
        self.head = self._scan(f.read(WHOLE_BYTES))
        self.whole = len(self.head) < WHOLE_BYTES
        self._rest = io.BytesIO(self.head)

    def read(self, size: int = -1) -> bytes:
        if self._rest is not None:
            data = self._rest.read(size)
            if data:
                return data
            self._rest = self.head = None  # served: let it go
        return self._scan(self._f.read(size))

    def _scan(self, data: bytes) -> bytes:
        self.newlines += data.count(b"\n")
        self.plain = self.plain and b'"' not in data and b"\r" not in data
        self.last = data[-1:] or self.last
        return data


def record_lines(buf: np.ndarray, sep: int) -> np.ndarray | None:
    r"""The line each non-blank record ends on, as ``csv.reader.line_num`` counts lines.

    Lines end at ``\n``, ``\r\n`` or a lone ``\r``, inside quotes or not. Returns None where
    quoting is irregular (a quote within an unquoted field, text after a closing quote, an
    unclosed quote) or the first record is blank: Python's csv module decides those.
    """
    size = len(buf)
    if not size:
        return None
    cr = _positions(buf, 13)
    ends = np.union1d(_positions(buf, 10), cr[buf[np.minimum(cr + 1, size - 1)] != 10])
    crlf = (ends > 0) & (buf[np.maximum(ends - 1, 0)] == 13) & (buf[ends] == 10)
    quotes = _positions(buf, 34)
    if len(quotes) % 2:
        return None
    opens, closes = quotes[0::2], quotes[1::2]
    before, after = buf[np.maximum(opens - 1, 0)], buf[np.minimum(closes + 1, size - 1)]
    # An opening quote starts a field, a closing one ends it; or the two are an escaped "".
    if not (np.isin(before, (sep, 10, 13, 34)) | (opens == 0)).all():
        return None
    if not (np.isin(after, (sep, 10, 13, 34)) | (closes == size - 1)).all():
        return None
    breaks = np.flatnonzero(np.searchsorted(quotes, ends) % 2 == 0)  # line ends outside quotes
    starts = np.concatenate(([0], ends[breaks][:-1] + 1))
    nonblank = starts < ends[breaks] - crlf[breaks]
    lines = breaks + 1
    if not len(breaks) or ends[breaks[-1]] < size - 1:  # a last record without a line break
        nonblank, lines = np.append(nonblank, True), np.append(lines, len(ends) + 1)
    return lines[nonblank] if nonblank[0] else None


def _positions(buf: np.ndarray, byte: int) -> np.ndarray:
    """Indices of ``byte`` in ``buf``, compared a chunk at a time to bound the temporary."""
    found = [np.flatnonzero(buf[i:i + _CHUNK] == byte) + i for i in range(0, len(buf), _CHUNK)]
    return np.concatenate(found) if found else np.zeros(0, dtype=np.intp)


def _may_need_strip(col: pa.ChunkedArray) -> bool:
    """Whether a value may start or end with whitespace, judged from its first and last byte.

    Bytes outside ``!``..DEL count (ASCII whitespace and controls, bytes of non-ASCII
    characters). An empty value's edges are its neighbours' (clipped at the buffer's ends).
    """
    for chunk in col.chunks:
        _, offsets, data = chunk.buffers()
        if data:
            bounds = np.frombuffer(offsets, dtype=np.int32)[chunk.offset:chunk.offset + len(chunk) + 1]
            edges = np.frombuffer(data, dtype=np.uint8).take(
                np.concatenate((bounds[:-1], bounds[1:] - 1)), mode="clip")
            if ((edges - np.uint8(33)) >= 95).any():  # below 33 wraps round to 223 and up
                return True
    return False


def _open(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _pool() -> pa.MemoryPool:
    """jemalloc where pyarrow has it: reading ChestX-ray14 it peaked at 21 MB, mimalloc at 29."""
    import pyarrow as pa  # noqa: PLC0415 - only reading a label file pays for pyarrow

    try:
        return pa.jemalloc_memory_pool()
    except NotImplementedError:
        return pa.default_memory_pool()
