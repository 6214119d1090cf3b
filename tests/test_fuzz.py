"""Property-based tests: hostile or broken input ends in our own clear error, never a crash.

Config loader -> ConfigError; label files -> DatasetError (or a manifest); image files ->
ImageReadError (or an image); site updates -> UpdateRejected. Any other exception, a hang
(hypothesis deadline) or a huge allocation fails the test.
"""

import io
import json
import re
import shutil
import struct
import tempfile
import zlib
from collections import ChainMap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from flwr.app import Array
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ark_core.config import ArkConfig, ConfigError, load_config, parse_config
from ark_core.data import DatasetError, build_manifest
from ark_core.data.readers import ImageReadError, read_image, read_image_resized
from ark_core.fed.aggregate import StreamingAggregator, UpdateRejected
from ark_core.fed.federation import FederationConfig, SimulationConfig, SiteConfig
from ops.arrays import Tensors, to_tensor

FX = Path(__file__).parent / "fixtures"
FAST = settings(max_examples=40, deadline=2000, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
CONFIGS = [ArkConfig, FederationConfig, SimulationConfig, SiteConfig]

# ----------------------------------------------------------------------------- config
VALID = {
    "model": {"preset": "tiny", "backbone_kwargs": {"window_size": 4}},
    "catalogue": [{"name": "a", "labels": ["x", "y"], "task_type": "multilabel"}],
    "rounds": 2,
    "train": {"lr": 0.001, "batch_size": 4},
    "aggregation": {"method": "mean"},
    "privacy": {"clip_norm": 1.0, "noise_multiplier": 1.0},
    "sites": [{"name": "s", "tasks": [{"name": "a", "dataset": "csv", "root": "d",
                                       "labels": ["x", "y"], "split": {"seed": 1}}]}],
}
leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(),
                 st.text(max_size=12), st.binary(max_size=8))
json_like = st.recursive(leaf, lambda c: st.one_of(
    st.lists(c, max_size=4), st.dictionaries(st.text(max_size=10), c, max_size=4)), max_leaves=20)


def _paths(d, prefix=()):
    """Every key path of a nested dict/list."""
    items = d.items() if isinstance(d, dict) else enumerate(d) if isinstance(d, list) else []
    for k, v in items:
        yield prefix + (k,)
        yield from _paths(v, prefix + (k,))


PATHS = list(_paths(VALID))


def _mutate(path, value):
    import copy

    d = copy.deepcopy(VALID)
    node = d
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return d


_PART = r'(?:[^".:]+|"(?:[^"\\]|\\.)*")'  # as written, or JSON-quoted
ERROR_LINE = re.compile(
    rf"^(?P<src><config>)(?::\d+)?: (?P<field>\(top level\)|{_PART}(?:\.{_PART})*): (?P<msg>.+)$")


def _field_errors(data, cls) -> list[tuple[str, ...]] | None:
    """None if ``data`` is a valid ``cls``; else the fields its error names, one per line.

    Every line must read ``<config>: field.path: message``; anything else (another
    exception, a line without a field) fails the test.
    """
    try:
        parse_config(data, cls)
    except ConfigError as e:
        lines = str(e).splitlines()
        assert lines, "an empty error"
        fields = []
        for line in lines:
            m = ERROR_LINE.match(line)
            assert m, f"not a field-named error: {line!r}"
            parts = re.findall(_PART, m["field"])
            fields.append(() if m["field"] == "(top level)" else tuple(
                json.loads(x) if x.startswith('"') else x for x in parts))
        return fields
    return None


def _related(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def test_the_fuzzed_documents_start_valid():
    assert _field_errors(VALID, SimulationConfig) is None
    assert _field_errors({k: v for k, v in VALID.items() if k != "sites"}, FederationConfig) is None


@FAST
@given(st.sampled_from(CONFIGS), st.sampled_from(PATHS), json_like)
def test_config_with_one_field_replaced(cls, path, value):
    """A valid config that one replacement makes invalid names that field, or a section
    holding it (a rule across fields), never an unrelated one."""
    doc = _mutate(path, value)
    if cls is FederationConfig:
        doc.pop("sites")
        path = path if path[0] != "sites" else ("sites",)
    fields = _field_errors(doc, cls)
    if fields is not None and cls in (SimulationConfig, FederationConfig) and path != ("sites",):
        where = tuple(str(k) for k in path)
        assert any(_related(f, where) for f in fields), (where, fields)


@FAST
@given(st.sampled_from(CONFIGS), json_like)
def test_config_random_documents(cls, data):
    if not isinstance(data, dict):
        with pytest.raises(ConfigError, match="expected a mapping at the top level"):
            parse_config(data, cls)
    else:
        _field_errors(data, cls)


@FAST
@given(st.sampled_from(CONFIGS), st.one_of(
    st.text(max_size=200),
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    st.sampled_from(PATHS).flatmap(lambda p: json_like.map(
        lambda v: yaml.safe_dump(_mutate(p, v if not isinstance(v, bytes) else str(v))))),
))
def test_config_random_yaml_files(cls, text):
    """Every line of the error starts with the file's path and says what is wrong."""
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "c.yaml"
        p.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            load_config(p, cls)
        except ConfigError as e:
            for line in str(e).splitlines():
                assert line.startswith(str(p)) and len(line) > len(str(p)) + 2, line


# ----------------------------------------------------------------------------- label files
LABEL_FILES = {  # dataset -> (fixture folder, label file, options)
    "chestxray14": ("chestxray14", "Data_Entry_2017_v2020.csv", {}),
    "chexpert": ("chexpert", "train.csv", {}),
    "csv": ("csv", "labels.csv", {"label_columns": ["Effusion", "Pneumonia"],
                                  "patient_column": "patient", "split_column": "split"}),
    "vindr_cxr": ("vindr_cxr_kaggle", "train.csv", {}),
}
cell = st.one_of(st.text(alphabet=',|".-01 ab\n\t/\\é', max_size=8),
                st.sampled_from(["1.0", "-1.0", "0.0", "..", "../x", "/etc/passwd", "P1"]))


@st.composite
def label_text(draw, header: str):
    """The real header with random rows, or a random header, or random text."""
    kind = draw(st.integers(0, 2))
    if kind == 2:
        return draw(st.text(max_size=300))
    head = header if kind == 0 else ",".join(draw(st.lists(cell, max_size=6)))
    rows = draw(st.lists(st.lists(cell, max_size=header.count(",") + 3), max_size=8))
    return head + "\n" + "\n".join(",".join(r) for r in rows)


@pytest.mark.parametrize("dataset", sorted(LABEL_FILES))
def test_label_files_fuzzed(dataset, tmp_path):
    from ark_core.config import TaskConfig

    folder, name, options = LABEL_FILES[dataset]
    root = tmp_path / folder
    shutil.copytree(FX / folder, root)
    header = (FX / folder / name).read_text(encoding="utf-8").splitlines()[0]
    cfg = TaskConfig(name="t", dataset=dataset, root=root, options=options)
    outcomes = {"error": 0, "manifest": 0}

    @FAST
    @given(label_text(header))
    def run(text):
        (root / name).write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            build_manifest(cfg, "all", tmp_path)
            outcomes["manifest"] += 1
        except DatasetError:
            outcomes["error"] += 1

    run()
    assert outcomes["error"] > 0  # the fuzzer did reach the checks


# ----------------------------------------------------------------------------- images
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, body: bytes = b"") -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(body)) + _png_chunk(b"IEND", b""))


def _samples() -> dict[str, bytes]:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.arange(64 * 48, dtype=np.uint8).reshape(48, 64)).save(buf, "JPEG")
    dicom = next((FX / "vindr_cxr_kaggle" / "train").glob("*.dicom"))
    png = next((FX / "chestxray14" / "images").glob("*.png"))
    return {".png": png.read_bytes(), ".jpg": buf.getvalue(), ".dicom": dicom.read_bytes()}


SAMPLES = _samples()


def _read_ok(data: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"x{suffix}"
        p.write_bytes(data)
        for fn in (read_image, lambda q: read_image_resized(q, 32)):
            try:
                arr = fn(p)
            except ImageReadError:
                continue
            assert arr.dtype == np.uint8 and arr.ndim == 2 and arr.size > 0


@FAST
@given(st.sampled_from(sorted(SAMPLES)), st.floats(0, 1))
def test_truncated_images(suffix, frac):
    data = SAMPLES[suffix]
    _read_ok(data[: int(len(data) * frac)], suffix)


@FAST
@given(st.sampled_from([".png", ".jpg", ".dicom", ".bin"]), st.binary(max_size=600))
def test_random_bytes_as_images(suffix, data):
    _read_ok(data, suffix)
    _read_ok(b"\x00" * 128 + b"DICM" + data, suffix)  # a DICOM preamble, then garbage


@FAST
@given(st.sampled_from(sorted(SAMPLES)), st.integers(0, len(SAMPLES[".dicom"]) - 1), st.binary(
    min_size=1, max_size=8))
def test_corrupted_bytes_in_images(suffix, at, junk):
    data = bytearray(SAMPLES[suffix])
    at = at % len(data)
    data[at: at + len(junk)] = junk
    _read_ok(bytes(data), suffix)


@pytest.mark.parametrize("width,height", [(0, 0), (0, 10), (10, 0), (100_000, 100_000),
                                          (2**31 - 1, 2**31 - 1), (1, 2**31 - 1)])
def test_png_declared_dimensions(tmp_path, width, height):
    p = tmp_path / "x.png"
    p.write_bytes(_png(width, height, b"\x00" * 64))
    with pytest.raises(ImageReadError):
        read_image(p)


@pytest.mark.parametrize("rows,cols", [(0, 0), (65535, 65535), (1, 65535)])
def test_dicom_declared_dimensions(tmp_path, rows, cols):
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(SAMPLES[".dicom"]))
    ds.Rows, ds.Columns = rows, cols
    p = tmp_path / "x.dcm"
    ds.save_as(p)
    with pytest.raises(ImageReadError):
        read_image(p)


def test_empty_file(tmp_path):
    for suffix in (".png", ".jpg", ".dcm"):
        (tmp_path / f"e{suffix}").write_bytes(b"")
        with pytest.raises(ImageReadError, match="empty"):
            read_image(tmp_path / f"e{suffix}")


# ----------------------------------------------------------------------------- updates
MASTER = {"backbone.w": torch.zeros(3, 4), "heads.a.weight": torch.zeros(2, 4),
          "heads.b.weight": torch.zeros(1, 4)}
DTYPES = [np.float32, np.float16, np.float64, np.int64, np.int8, np.bool_, np.complex64]
shapes = st.lists(st.integers(0, 5), max_size=3).map(tuple)


@st.composite
def update(draw):
    names = draw(st.lists(st.sampled_from(sorted(MASTER) + ["heads.c.weight", "x", ""]),
                          unique=True, max_size=5))
    out = {}
    for n in names:
        shape = draw(st.one_of(st.just(tuple(MASTER[n].shape)) if n in MASTER else shapes, shapes))
        dtype = draw(st.sampled_from(DTYPES))
        a = np.zeros(shape, dtype=dtype)
        if a.size and np.issubdtype(dtype, np.floating):
            a.flat[draw(st.integers(0, a.size - 1))] = draw(st.sampled_from(
                [np.nan, np.inf, -np.inf, 1e30, 0.5]))
        out[n] = draw(st.sampled_from(["numpy", "torch", "flower"])), a
    return out


def _as(kind, a):
    if kind == "numpy":
        return a
    if kind == "torch":
        return torch.from_numpy(a) if a.dtype != np.complex64 else a
    return to_tensor(Array(a))


def _acceptable(upd: dict, tasks: list[str]) -> bool:
    """The rule, stated apart from the code: exactly the shared tensors and the declared
    catalogue tasks' heads, each of the master's shape and dtype, every value finite."""
    if set(tasks) - {"a", "b"}:
        return False
    expected = {k for k in MASTER if not k.startswith("heads.") or k.split(".")[1] in tasks}
    return set(upd) == expected and all(
        a.shape == tuple(MASTER[k].shape) and a.dtype == np.float32 and np.isfinite(a).all()
        for k, (_, a) in upd.items())


GOOD = {k: torch.full_like(v, 0.25) for k, v in MASTER.items() if k != "heads.b.weight"}


def _fold(extra: tuple[str, dict, list[str]] | None) -> tuple[bool, dict[str, torch.Tensor]]:
    """Fold a good site's update, then ``extra`` (site, update, tasks) if any: (accepted, result)."""
    agg = StreamingAggregator(MASTER)
    agg.add("good", GOOD, 4, {"a": 4})
    accepted = True
    if extra is not None:
        site, upd, tasks = extra
        try:
            agg.add(site, upd, 2, dict.fromkeys(tasks, 2))
        except UpdateRejected:
            accepted = False
    return accepted, agg.result()


VALID_A = {k: ("flower", np.full(tuple(v.shape), 0.5, np.float32))
           for k, v in MASTER.items() if k != "heads.b.weight"}


@settings(max_examples=150, deadline=2000, derandomize=True)
@given(update(), st.lists(st.sampled_from(["a", "b", "c", ""]), unique=True, max_size=3))
@example(VALID_A, ["a"])  # accepted: both outcomes are always exercised
@example({**VALID_A, "heads.a.weight": ("torch", np.full((2, 4), np.nan, np.float32))}, ["a"])
def test_update_validator_fuzzed(upd, tasks):
    """Accepted exactly when the rule says so; a rejected update leaves the master bit-identical."""
    accepted, master = _fold(("bad", {k: _as(kind, a) for k, (kind, a) in upd.items()}, tasks))
    assert accepted == _acceptable(upd, tasks)
    if not accepted:
        _, without = _fold(None)
        assert all(torch.equal(master[k], without[k]) for k in MASTER)


def _npy_prefix(tail: bytes) -> bytes:
    """A real .npy header of another array, then random bytes."""
    buf = io.BytesIO()
    np.save(buf, np.zeros((3, 4), np.float32))
    return buf.getvalue()[:128] + tail


def _decodes_to_declared(data: bytes, dtype: str, shape: tuple) -> bool:
    """Whether ``data`` is a .npy of a finite float32 (3, 4) array, as declared and expected."""
    try:
        a = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception:  # noqa: BLE001 - any failure to parse means it is not one
        return False
    return (dtype == "float32" and tuple(shape) == (3, 4) and a.dtype == np.float32
            and a.shape == (3, 4) and bool(np.isfinite(a).all()))


@FAST
@given(st.one_of(st.binary(max_size=300), st.binary(max_size=48).map(_npy_prefix)),
       st.sampled_from(["float32", "float32", "float16"]), st.one_of(st.just((3, 4)), shapes))
@example(_npy_prefix(np.ones((3, 4), np.float32).tobytes()), "float32", (3, 4))  # a true one
@example(_npy_prefix(b"\x00" * 47), "float32", (3, 4))  # one byte short
def test_update_validator_on_forged_flower_arrays(data, dtype, shape):
    """Declared dtype/shape right, payload forged: bytes that are no (or another) .npy."""
    forged = Array(dtype=dtype, shape=tuple(shape), stype="numpy.ndarray", data=data)
    # The server views a reply's Arrays as tensors (ops.arrays), decoding each when read.
    upd = ChainMap(Tensors({"backbone.w": forged}), {"heads.a.weight": np.zeros((2, 4), np.float32)})
    accepted, master = _fold(("forger", upd, ["a"]))
    assert accepted == _decodes_to_declared(data, dtype, shape)
    if not accepted:
        _, without = _fold(None)
        assert all(torch.equal(master[k], without[k]) for k in MASTER)
