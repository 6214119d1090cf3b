"""Image readers on real radiographs and on generated DICOM files."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_helpers import write_dicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from ark_core.data import readers
from ark_core.data.readers import ImageReadError, read_image, read_image_near, read_image_resized

NIH = Path(__file__).resolve().parents[1] / "simulations" / "demo_data" / "nih" / "images"
PEDIATRIC = Path(__file__).resolve().parents[1] / "simulations" / "demo_data" / "pediatric" / "train"
needs_data = pytest.mark.skipif(not NIH.is_dir() or not PEDIATRIC.is_dir(), reason="no data")


def nih_png() -> Path:
    return sorted(NIH.glob("*.png"))[0]


def pediatric_jpeg() -> Path:
    return sorted((PEDIATRIC / "NORMAL").glob("*.jpeg"))[0]


# ------------------------------------------------------------------------------ PNG / JPEG
@needs_data
def test_png_8bit_is_read_unchanged():
    arr = read_image(nih_png())
    assert arr.dtype == np.uint8 and arr.ndim == 2
    np.testing.assert_array_equal(arr, np.asarray(Image.open(nih_png())))


@needs_data
@pytest.mark.parametrize("factor", [257, 16])  # full 16-bit range, 12 bits in 16
def test_png_16bit_is_stretched_to_8bit(tmp_path, factor):
    arr8 = np.asarray(Image.open(nih_png())).astype(np.int64)
    path = tmp_path / "x16.png"
    Image.fromarray((arr8 * factor).astype(np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    got = read_image(path)
    expected = np.rint((arr8 - arr8.min()) / (arr8.max() - arr8.min()) * 255)
    assert got.dtype == np.uint8
    assert np.abs(got.astype(int) - expected).max() <= 1


@needs_data
def test_jpeg_rgb_becomes_grey():
    arr = read_image(pediatric_jpeg())
    assert arr.shape == (96, 96) and arr.dtype == np.uint8
    np.testing.assert_array_equal(arr, np.asarray(Image.open(pediatric_jpeg()).convert("L")))


def test_rgb_png_uses_luma(tmp_path):
    rgb = np.zeros((8, 12, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    Image.fromarray(rgb).save(tmp_path / "c.png")
    arr = read_image(tmp_path / "c.png")
    assert arr.shape == (8, 12)
    assert abs(int(arr[0, 0]) - round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)) <= 1


@needs_data
def test_resized_is_square_and_close_to_full_decode(tmp_path):
    big = Image.open(pediatric_jpeg()).convert("L").resize((1000, 800), Image.Resampling.BICUBIC)
    big.save(tmp_path / "big.jpeg", quality=95)
    small = read_image_resized(tmp_path / "big.jpeg", 100)  # JPEG draft decoding
    assert small.shape == (100, 100) and small.dtype == np.uint8
    reference = np.asarray(big.resize((100, 100), Image.Resampling.BILINEAR)).astype(float)
    assert np.abs(small.astype(float) - reference).mean() < 3.0
    png = read_image_resized(nih_png(), 37)
    assert png.shape == (37, 37)
    up = read_image_resized(nih_png(), 300)
    assert up.shape == (300, 300)
    with pytest.raises(ValueError):
        read_image_resized(nih_png(), 0)


# ---------------------------------------------------------------------------------- DICOM
def ramp(lo: int, hi: int, shape=(16, 16)) -> np.ndarray:
    return np.linspace(lo, hi, shape[0] * shape[1]).round().astype(np.int64).reshape(shape)


@pytest.mark.parametrize("bits", [12, 16])
def test_dicom_without_window_is_min_max(tmp_path, bits):
    stored = ramp(100, 2**bits - 1)
    arr = read_image(write_dicom(tmp_path / "a.dcm", stored, bits_stored=bits))
    assert arr.dtype == np.uint8 and arr.shape == (16, 16)
    assert arr.min() == 0 and arr.max() == 255
    assert np.all(np.diff(arr.ravel().astype(int)) >= 0)  # monotone
    expected = np.rint((stored - 100) / (2**bits - 1 - 100) * 255)
    assert np.abs(arr.astype(int) - expected).max() <= 1


def test_dicom_12bit_ignores_bits_above_bits_stored(tmp_path):
    stored = ramp(0, 4095)
    dirty = stored | 0xF000  # garbage in the 4 unused high bits
    clean = read_image(write_dicom(tmp_path / "c.dcm", stored, bits_stored=12))
    got = read_image(write_dicom(tmp_path / "d.dcm", dirty, bits_stored=12))
    np.testing.assert_array_equal(got, clean)


def test_dicom_rescale_then_window(tmp_path):
    # stored s -> HU = 2 s - 1024; window 40/400 covers HU -160..240.
    hu = np.array([[-1024, -200, -160, 40, 240, 300, 1000, -100]])
    stored = (hu + 1024) // 2
    path = write_dicom(tmp_path / "w.dcm", stored, bits_stored=12, rescale=(2, -1024),
                       window=(40, 400))  # fmt: skip
    arr = read_image(path).astype(int)[0]
    assert arr[0] == 0 and arr[1] == 0  # below the window
    assert arr[5] == 255 and arr[6] == 255  # above the window
    assert abs(arr[3] - 128) <= 1  # the window centre is mid-grey
    # Inside the window the map is linear in HU, not in stored values.
    assert abs(arr[7] - (-100 - (40 - 0.5)) / 399 * 255 - 127.5) <= 1
    assert arr[2] <= 1 and arr[4] >= 254


def test_dicom_monochrome1_is_inverted(tmp_path):
    stored = ramp(0, 4095)
    kw = dict(bits_stored=12, rescale=(1.0, 0.0), window=(2048, 3000))
    mono2 = read_image(write_dicom(tmp_path / "m2.dcm", stored, **kw))
    mono1 = read_image(write_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1", **kw))
    assert np.abs(mono1.astype(int) - (255 - mono2.astype(int))).max() <= 1  # rounding ties
    assert np.corrcoef(mono1.ravel(), mono2.ravel())[0, 1] < -0.99
    assert mono1[0, 0] == 255 and mono1[-1, -1] == 0  # low stored value = bright in MONOCHROME1


@pytest.mark.parametrize(
    ("function", "expected"),
    [("LINEAR", [0, 0, 85, 170, 255, 255]), ("LINEAR_EXACT", [0, 0, 64, 128, 191, 255])],
)
def test_dicom_narrow_window_follows_the_standard(tmp_path, function, expected):
    # PS3.3 C.11.2.1.2: LINEAR spans c - 0.5 +- (w - 1) / 2, LINEAR_EXACT spans c +- w / 2.
    stored = np.array([[7, 8, 9, 10, 11, 12]])
    path = write_dicom(tmp_path / "n.dcm", stored, window=(10, 4), voi_function=function)
    assert read_image(path)[0].tolist() == expected


def test_dicom_signed_with_multi_valued_window(tmp_path):
    stored = ramp(-1000, 1000)
    path = write_dicom(tmp_path / "s.dcm", stored, signed=True, window=([0, 500], [200, 1000]))
    arr = read_image(path).astype(int)
    flat, values = arr.ravel(), stored.ravel()
    assert np.all(flat[values <= -101] == 0) and np.all(flat[values >= 100] == 255)  # first window


def test_dicom_sigmoid_window(tmp_path):
    stored = np.array([[0, 500, 1000]])
    path = write_dicom(tmp_path / "g.dcm", stored, window=(500, 200), voi_function="SIGMOID")
    arr = read_image(path).astype(int)[0]
    assert arr[0] == 0 and abs(arr[1] - 128) <= 1 and arr[2] == 255


def test_dicom_voi_lut_sequence(tmp_path):
    stored = np.arange(256).reshape(16, 16)
    path = write_dicom(tmp_path / "l.dcm", stored, bits_stored=8, window=(10, 20))
    ds = pydicom.dcmread(path)
    item = Dataset()
    item.LUTDescriptor = [256, 0, 8]
    item.add_new("LUTData", "US", [255 - i for i in range(256)])  # a VOI LUT that inverts
    ds.VOILUTSequence = Sequence([item])
    ds.save_as(path)
    arr = read_image(path)  # the LUT takes precedence over the window
    np.testing.assert_array_equal(arr.astype(int), 255 - stored)


def test_dicom_detected_by_preamble_without_suffix(tmp_path):
    path = write_dicom(tmp_path / "image", ramp(0, 4095), bits_stored=12)
    assert read_image(path).max() == 255


@needs_data
def test_dicom_of_a_real_radiograph_round_trips(tmp_path):
    arr8 = np.asarray(Image.open(nih_png())).astype(np.int64)
    path = write_dicom(tmp_path / "r.dcm", arr8 * 16, bits_stored=12)
    got = read_image_resized(path, 64)
    ref = np.asarray(Image.fromarray(read_image(nih_png())).resize((64, 64), Image.BILINEAR))
    lo, hi = arr8.min(), arr8.max()
    ref = np.rint((ref.astype(float) - lo) / (hi - lo) * 255)
    assert got.shape == (64, 64) and np.abs(got - ref).mean() < 1.5


# ---------------------------------------------------------------------------------- errors
def truncated(src: Path, dst: Path, keep: float = 0.5) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


def bad_files(tmp: Path) -> dict[str, Path]:
    """name -> a file no reader may accept."""
    out = {
        "missing": tmp / "missing.png",
        "empty": tmp / "empty.png",
        "random": tmp / "random.png",
        "text": tmp / "notes.jpeg",
        "directory": tmp / "dir.png",
        "dicom_no_pixels": write_dicom(tmp / "np.dcm", ramp(0, 10), pixel_data=False),
        "dicom_truncated": truncated(
            write_dicom(tmp / "t0.dcm", ramp(0, 4095, (64, 64))), tmp / "t.dcm"
        ),  # fmt: skip
        "dicom_random": tmp / "random.dcm",
    }
    out["empty"].write_bytes(b"")
    rng = np.random.default_rng(0)
    out["random"].write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    out["dicom_random"].write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    out["text"].write_text("not an image\n")
    out["directory"].mkdir()
    if NIH.is_dir() and PEDIATRIC.is_dir():
        out["png_truncated"] = truncated(nih_png(), tmp / "cut.png")
        out["jpeg_truncated"] = truncated(pediatric_jpeg(), tmp / "cut.jpeg")
        out["png_header_only"] = truncated(nih_png(), tmp / "head.png", keep=0.02)
    return out


def test_bad_files_raise_image_read_error_naming_the_file(tmp_path):
    files = bad_files(tmp_path)
    for name, path in files.items():
        for read in (read_image, lambda p: read_image_resized(p, 32)):
            with pytest.raises(ImageReadError) as info:
                read(path)
            assert str(path) in str(info.value), name
            assert info.value.path == str(path) and info.value.reason
            assert isinstance(info.value, ValueError)
    assert "not found" in str(pytest.raises(ImageReadError, read_image, files["missing"]).value)
    assert "empty" in str(pytest.raises(ImageReadError, read_image, files["empty"]).value)


@needs_data
def test_too_many_pixels_is_refused(tmp_path):
    with pytest.raises(ImageReadError, match="too large"):
        read_image(nih_png(), max_pixels=1000)
    path = write_dicom(tmp_path / "big.dcm", ramp(0, 10, (40, 40)))
    with pytest.raises(ImageReadError, match="too large"):
        read_image(path, max_pixels=1000)


def test_zero_size_dicom_is_refused(tmp_path):
    path = write_dicom(tmp_path / "z.dcm", ramp(0, 10))
    ds = pydicom.dcmread(path)
    ds.Rows = 0
    ds.save_as(path)
    with pytest.raises(ImageReadError, match="zero-size"):
        read_image(path)


def test_error_survives_pickling():
    err = pickle.loads(pickle.dumps(ImageReadError("/x/y.png", "empty file")))
    assert err.path == "/x/y.png" and str(err) == "/x/y.png: empty file"


@needs_data
def test_copied_good_file_still_reads(tmp_path):
    # Guards the corruption tests above: the same bytes, uncut, are fine.
    dst = tmp_path / "ok.jpeg"
    shutil.copy(pediatric_jpeg(), dst)
    assert read_image(dst).shape == (96, 96)


# ------------------------------------------------------------------------ compressed DICOM
def _compress(src: Path, dst: Path, syntax: str) -> Path:
    """``src`` re-encoded by GDCM in transfer syntax ``syntax`` (a gdcm.TransferSyntax name)."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, syntax)))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(dst))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    return dst


# What PACS exports and public releases use: JPEG Lossless SV1 and JPEG-LS (CR/DX archives),
# JPEG 2000 (VinDr-CXR), RLE.
@needs_data
@pytest.mark.parametrize("syntax", [
    "JPEGLosslessProcess14_1", "JPEGLSLossless", "JPEG2000Lossless", "RLELossless"])
def test_lossless_compressed_dicom_reads_as_the_uncompressed(tmp_path, syntax):
    stored = np.asarray(Image.open(nih_png())).astype(np.uint16) * 16 + 3  # 12-bit values
    src = write_dicom(tmp_path / "raw.dcm", stored, bits_stored=12, window=(2048, 4096))
    packed = _compress(src, tmp_path / "packed.dcm", syntax)
    ts = pydicom.dcmread(packed, stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert ts.is_compressed and packed.stat().st_size < src.stat().st_size
    np.testing.assert_array_equal(read_image(packed), read_image(src))
    # A cut file fails with an error naming it, as an uncompressed one does.
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(packed.read_bytes()[: packed.stat().st_size * 2 // 3])
    with pytest.raises(ImageReadError, match="cut.dcm"):
        read_image(cut)


@needs_data
def test_jpeg_baseline_dicom_8bit(tmp_path):
    # RSNA Pneumonia's DICOMs are 8-bit JPEG Baseline (lossy): close to the source, not equal.
    grey = np.asarray(Image.open(nih_png()))
    src = write_dicom(tmp_path / "raw.dcm", grey, bits_stored=16)
    ds = pydicom.dcmread(src)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = grey.astype(np.uint8).tobytes()
    ds.save_as(src, enforce_file_format=True)
    packed = _compress(src, tmp_path / "baseline.dcm", "JPEGBaselineProcess1")
    assert pydicom.dcmread(packed).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    got = read_image(packed).astype(np.int16)
    assert np.abs(got - read_image(src).astype(np.int16)).mean() < 2.0


# ------------------------------------------------------------------------------ MetaImage
MHA = Path(__file__).resolve().parent / "fixtures" / "metaimage"  # written by SimpleITK 2.5.7


def _mha(path: Path, body: bytes, **fields) -> Path:
    """A MetaImage file with these header fields (ElementDataFile last, as the format wants)."""
    head = {"ObjectType": "Image", "NDims": 2, "BinaryData": "True",
            "BinaryDataByteOrderMSB": "False", "CompressedData": "False", "DimSize": "4 3",
            "ElementType": "MET_USHORT", **fields, "ElementDataFile": fields.get(
                "ElementDataFile", "LOCAL")}
    path.write_bytes("".join(f"{k} = {v}\n" for k, v in head.items()).encode() + body)
    return path


@pytest.mark.parametrize("name", ["short_raw.mha", "short_zlib.mha", "float_stack_zlib.mha"])
def test_metaimage_files_written_by_simpleitk_read_as_written(name):
    from ark_core.data.metaimage import read_mha

    want = np.load(MHA / "pixels.npy")
    got = read_mha(MHA / name, 10**8)
    assert got.shape == want.shape == (24, 32)
    np.testing.assert_array_equal(got.astype(np.int64), want.astype(np.int64))
    # As a film: the pixels stretched to 0..255, like 16-bit PNGs.
    film = read_image(MHA / name)
    assert film.dtype == np.uint8 and (film.min(), film.max()) == (0, 255)
    lo, hi = want.min(), want.max()
    np.testing.assert_array_equal(film, np.rint((want - lo) / (hi - lo) * 255).astype(np.uint8))
    assert read_image_resized(MHA / name, 16).shape == (16, 16)


def test_metaimage_big_endian_and_a_header_check_without_decoding(tmp_path):
    from ark_core.data.dataset import check_file
    from ark_core.data.filecheck import sniff
    from ark_core.data.metaimage import read_mha

    px = (np.arange(12).reshape(3, 4) * 1000).astype(">u2")
    f = _mha(tmp_path / "msb.mha", px.tobytes(), BinaryDataByteOrderMSB="True")
    np.testing.assert_array_equal(read_mha(f, 100), px)
    assert check_file(f) is None and sniff(f) is None
    cut = _mha(tmp_path / "cut.mha", px.tobytes()[:-5])
    for why in (check_file(cut), sniff(cut)):
        assert why == "truncated pixel data (19 of 24 bytes)"


@pytest.mark.parametrize(("fields", "body", "reason"), [
    ({"ElementDataFile": "film.raw"}, b"", r"pixels in another file \(film\.raw\)"),
    ({"ElementNumberOfChannels": 3}, bytes(72), "more than one channel"),
    ({"NDims": 3, "DimSize": "4 3 2"}, bytes(48), r"not a 2-D image \(DimSize '4 3 2'\)"),
    ({"ElementType": "MET_UCHAR_ARRAY"}, bytes(12), "element type 'MET_UCHAR_ARRAY' is not"),
    ({"DimSize": "40000 40000"}, b"", r"image too large \(40000x40000 > 100000000 pixels\)"),
    ({"CompressedData": "True"}, b"not zlib", "cannot decompress the pixels"),
    ({"CompressedData": "True"}, __import__("zlib").compress(bytes(10)),
     r"truncated pixel data \(10 of 24 bytes\)"),
])
def test_metaimage_files_this_reader_cannot_use_are_named(tmp_path, fields, body, reason):
    f = _mha(tmp_path / "bad.mha", body, **fields)
    with pytest.raises(ImageReadError, match=rf"bad\.mha: {reason}"):
        read_image(f)


def test_a_file_that_is_not_metaimage_is_refused_by_name(tmp_path):
    f = tmp_path / "film.mha"
    f.write_bytes(Image.new("L", (4, 4)).tobytes() + b"\x89PNG")
    with pytest.raises(ImageReadError, match=r"film\.mha: header line .* is not 'Key = value'"):
        read_image(f)


@pytest.mark.parametrize("kw", [
    dict(bits_stored=12, window=(1800, 2500)),
    dict(bits_stored=12, rescale=(2, -1024), window=(40, 400), photometric="MONOCHROME1"),
    dict(signed=True, window=([0, 500], [200, 1000]), voi_function="SIGMOID"),
    dict(bits_stored=12),  # no window: min-max stretch of what the image holds
])
def test_dicom_per_value_table_equals_the_per_pixel_pipeline(tmp_path, kw):
    # Large enough (256x256) for the table path; the pipeline run on every pixel is the truth.
    rng = np.random.default_rng(0)
    lo = -1500 if kw.get("signed") else 300
    stored = rng.integers(lo, 3900, (256, 256))
    ds = pydicom.dcmread(write_dicom(tmp_path / "t.dcm", stored, **kw))
    pi = kw.get("photometric", "MONOCHROME2")
    got = read_image(tmp_path / "t.dcm")
    np.testing.assert_array_equal(got, readers._display(ds.pixel_array, ds, pi))
    assert len(np.unique(got)) > 50


def test_near_keeps_sizes_one_resampling_can_take(tmp_path):
    Image.fromarray(np.zeros((90, 120), np.uint8)).save(tmp_path / "a.png")
    assert read_image_near(tmp_path / "a.png", 100).shape == (90, 120)  # within 1.5x: as decoded
    assert read_image_near(tmp_path / "a.png", 80).shape == (90, 120)  # 120 = 1.5 x 80
    assert read_image_near(tmp_path / "a.png", 80, max_over=1.4).shape == (80, 80)
    assert read_image_near(tmp_path / "a.png", 50).shape == (50, 50)  # 2.4x: resized first
