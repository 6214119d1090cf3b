"""Label files read into columns: the same records, lines and errors as Python's csv module."""

import csv
import gzip
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ark_core.data.adapters import table as columnar
from ark_core.data.adapters.base import DatasetError, read_csv
from ark_core.data.adapters.table import WHITESPACE, Table, read_columns

ROOT = Path(__file__).resolve().parents[1]


def reference(path: Path, delimiter: str = ",") -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The dict-per-row reader the columns replaced (its records, lines and messages)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = [h.strip() for h in next(reader, [])]
        rows = []
        for fields in reader:
            if not fields:
                continue
            if len(fields) < len(header) or any(x.strip() for x in fields[len(header):]):
                raise DatasetError(f"{path}:{reader.line_num}: expected {len(header)} fields as in "
                                   f"the header, got {len(fields)}")
            rows.append((reader.line_num, dict(zip(header, map(str.strip, fields), strict=False))))
    return header, rows


def as_dicts(table: Table) -> list[tuple[int, dict[str, str]]]:
    return [(line, dict(row)) for line, row in table]


def assert_same(path: Path) -> None:
    """read_csv gives the reference's header and records, or raises its message."""
    try:
        expected = reference(path)
    except DatasetError as e:
        with pytest.raises(DatasetError) as got:
            read_csv(path)
        assert str(got.value) == str(e)
        return
    header, table = read_csv(path)
    assert (header, as_dicts(table)) == expected
    assert len(table) == len(expected[1])


TRICKY = {  # name -> (file bytes, whether Arrow reads it rather than the csv module)
    "plain": (b"a,b,c\n1,2,3\n4,5,6\n", True),
    "no final newline": (b"a,b\n1,2\n3,4", True),
    "quoted commas": (b'id,text\n1,"x, y"\n2,"a,b,c"\n', True),
    "quoted newlines": (b'id,text,n\n1,"two\nlines",x\n2,"three\n\nlines",y\n3,z,w\n', True),
    "escaped quotes": (b'id,text\n1,"say ""hi"", twice"\n2,""\n3,""""\n', True),
    "bom": (b'\xef\xbb\xbf"a",b\n1,2\n', True),
    "blank first line": (b"\n\na,b\n\n1,2\n\n\n3,4\n\n", False),  # the header is [] here
    "blank lines inside": (b"a,b\n\n1,2\n\n\n3,4\n\n", True),
    "crlf": (b"a,b\r\n1,2\r\n\r\n3,4\r\n", True),
    "lone cr": (b"a,b\r1,2\r\r3,4", True),
    "quoted crlf": (b'a,b\r\n1,"x\r\ny"\r\n2,"\r"\r\n', True),
    "trailing empty fields": (b"a,b\n1,2,,\n3,4, \n5,6\n", False),
    "whitespace": (b" a ,\tb\n 1 ,2\t\n\xc2\xa0x\xe2\x80\x83,\x1cy\n", True),
    "non-ascii": ("name,city\nJosé,Zürich\n東京,京都 \n".encode(), True),
    "duplicate names": (b"a,b,a\n1,2,3\n", True),
    "empty values": (b"a,b,c\n,,\n1,,\n", True),
    "header only": (b"a,b\n", True),
    "empty file": (b"", False),
    "quote inside a field": (b'a,b\nx"y,2\n', False),
    "text after a closing quote": (b'a,b\n"x"y,2\n', False),
    "space before a quote": (b'a,b\n "x,y",2\n', False),
    "unclosed quote": (b'a,b\n1,"x\n', False),
}


@pytest.fixture(params=["whole", "streamed"])
def streamed(request, monkeypatch):
    """Files parsed from memory, or streamed through Python (a 5-byte head read first)."""
    if request.param == "streamed":
        monkeypatch.setattr(columnar, "WHOLE_BYTES", 5)


@pytest.mark.parametrize("name", sorted(TRICKY))
@pytest.mark.parametrize("gz", [False, True])
def test_columns_match_the_csv_module(tmp_path, name, gz, streamed):
    raw, arrow = TRICKY[name]
    path = tmp_path / ("labels.csv.gz" if gz else "labels.csv")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    assert_same(path)
    assert (read_columns(path, ",") is not None) == arrow  # which path read it


def test_other_delimiters(tmp_path):
    path = tmp_path / "labels.tsv"
    path.write_bytes(b"a\tb\n1,2\t 3 \n")
    assert as_dicts(read_csv(path, delimiter="\t")[1]) == reference(path, "\t")[1]
    path.write_bytes("a§b\n1§2\n".encode())  # two UTF-8 bytes: the csv module reads it
    assert as_dicts(read_csv(path, delimiter="§")[1]) == [(2, {"a": "1", "b": "2"})]


cell = st.text(alphabet=' ,"\n\r\tab1\xa0é', max_size=5)


@st.composite
def csv_bytes(draw) -> bytes:
    """Rows joined as they come (mostly malformed), or written by csv.writer (well formed)."""
    width = draw(st.integers(1, 4))
    rows = draw(st.lists(st.lists(cell, min_size=width, max_size=width), min_size=1, max_size=6))
    if draw(st.booleans()):
        return "\n".join(",".join(row) for row in rows).encode()
    out = io.StringIO()
    csv.writer(out, lineterminator=draw(st.sampled_from(["\n", "\r\n", "\r"]))).writerows(rows)
    return out.getvalue().encode()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=csv_bytes())
def test_random_files_match_the_csv_module(tmp_path, raw, streamed):
    path = tmp_path / "labels.csv"
    path.write_bytes(raw)
    assert_same(path)


def test_the_whitespace_stripped_is_str_strip(tmp_path):
    assert WHITESPACE == "".join(c for c in map(chr, range(0x110000)) if c.isspace())
    path = tmp_path / "labels.csv"
    path.write_bytes(f'a,b\n"{WHITESPACE}x{WHITESPACE}",y\u200b\n'.encode())
    assert_same(path)
    assert [dict(r) for _, r in read_csv(path)[1]] == [{"a": "x", "b": "y\u200b"}]  # ZWSP: no space


@pytest.mark.parametrize(("text", "message"), [
    ("a,b,c\n1,2,3\n4,5\n", r"labels\.csv:3: expected 3 fields as in the header, got 2"),
    ('a,b\n"1\n2",3\n4,5,6\n', r"labels\.csv:4: expected 2 fields as in the header, got 3"),
    ("a,b\n1,2\n3,4,x\n", r"labels\.csv:3: expected 2 fields as in the header, got 3"),
    ("a,b\n1,2\n", r"labels\.csv:1: missing column\(s\) \['c'\]; the header has \['a', 'b'\]"),
])
def test_errors_name_file_and_line(tmp_path, text, message):
    path = tmp_path / "labels.csv"
    path.write_text(text)
    with pytest.raises(DatasetError, match=message):
        read_csv(path, ["a", "c"] if "missing" in message else ["a"])


def test_a_missing_column_is_reported_before_a_bad_row(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("a,b\n1\n")
    with pytest.raises(DatasetError, match=r":1: missing column"):
        read_csv(path, ["c"])


@pytest.mark.parametrize("gz", [False, True])
def test_not_utf8_names_the_line(tmp_path, gz):
    path = tmp_path / ("labels.csv.gz" if gz else "labels.csv")
    for raw, message in [
        (b"a,b\n1,2\n3,Z\xfcrich\n", r"labels\.csv(\.gz)?:3: not UTF-8 \(byte 0xfc at byte 4 of the "
                                     r"line\): re-save as UTF-8"),
        (b"a,\xe9\n1,2\n", r"labels\.csv(\.gz)?:1: not UTF-8 \(byte 0xe9"),
        ("a,b\n1,2\n".encode("utf-16"), r"labels\.csv(\.gz)?: not UTF-8 \(it is UTF-16.*re-save"),
    ]:
        path.write_bytes(gzip.compress(raw) if gz else raw)
        with pytest.raises(DatasetError, match=message):
            read_csv(path)


def test_a_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="nope.csv: file not found"):
        read_csv(tmp_path / "nope.csv")


def test_rows_are_read_only_mappings(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("a,b\n" + "".join(f"{i},x{i}\n" for i in range(10000)))
    header, table = read_csv(path)
    line, row = table[-1]
    assert (line, row["b"], row.get("c", "-")) == (10001, "x9999", "-")
    assert "a" in row and "c" not in row
    assert list(row) == ["a", "b"] and len(row) == 2 and row == {"a": "9999", "b": "x9999"}
    with pytest.raises(KeyError):
        row["c"]
    with pytest.raises(IndexError):
        table[10000]
    kept = list(table)  # rows stay valid after the loop moves past their block
    assert dict(kept[0][1]) == {"a": "0", "b": "x0"} and kept[5000][0] == 5002
    assert table.columns["b"].to_pylist()[:2] == ["x0", "x1"]


def test_importing_the_data_layer_leaves_pyarrow_out():
    code = "import sys, ark_core.data; print('pyarrow' in sys.modules, 'pandas' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=ROOT)
    assert r.stdout.split() == ["False", "False"], r.stderr


_MEASURE = """
import csv, gc, json, sys
from pathlib import Path
import pyarrow, pyarrow.csv, pyarrow.compute
sys.path.insert(0, {tests!r})
from test_label_reading import as_dicts, reference
from ark_core.data.adapters.base import read_csv

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

gc.collect()
before = rss()
kept = (reference if sys.argv[1] == "dicts" else read_csv)(Path(sys.argv[2]))
gc.collect()
print(json.dumps(rss() - before))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads RSS from /proc")
def test_columns_hold_far_less_than_a_dict_per_row(tmp_path):
    path = tmp_path / "labels.csv"
    with path.open("w") as f:  # ChestX-ray14-like: 200,000 rows of 9 columns
        f.write("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
                "View Position,Width,Height\n")
        for i in range(200_000):  # one value to strip, far into the file (in a later block)
            findings = " Mass\t" if i == 150_000 else "Effusion|Mass"
            f.write(f"{i:08d}_000.png,{findings},{i % 7},{i // 3},{i % 90},MF"[: -1 - i % 2]
                    + f",PA,{2500 + i % 500},{2048 + i % 300}\n")
    held = {}
    code = _MEASURE.format(tests=str(ROOT / "tests"))
    for arm in ("dicts", "columns"):
        r = subprocess.run([sys.executable, "-c", code, arm, str(path)],
                           capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        held[arm] = json.loads(r.stdout)
    # The dict layout held ~9x the file; the columns about the file's size.
    assert held["columns"] < held["dicts"] / 4, {k: v / 2**20 for k, v in held.items()}
    _, rows = read_csv(path)
    assert as_dicts(rows) == reference(path)[1]
    assert rows.columns["Finding Labels"].num_chunks > 1


def test_table_iteration_matches_indexing(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_bytes(b'a,b\n1,"x\ny"\n\n2,z\n')
    _, table = read_csv(path)
    assert [table[i] for i in range(len(table))] == list(table)
