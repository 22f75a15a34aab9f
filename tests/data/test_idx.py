"""read_idx on hand-made IDX files (written here with struct, independently of the reader)."""

import gzip
import re
import struct

import numpy as np
import pytest

from samkit.data import read_idx


def idx_bytes(code, dims, payload):
    return bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + payload


@pytest.mark.parametrize(
    "code, fmt, values",
    [
        (0x08, "B", [0, 1, 127, 255, 7, 9]),
        (0x09, "b", [-128, -1, 0, 1, 5, 127]),
        (0x0B, "h", [-32768, -2, 0, 3, 300, 32767]),
        (0x0C, "i", [-(2**31), -70000, 0, 1, 70000, 2**31 - 1]),
        (0x0D, "f", [-1.5, 0.25, 0.0, 3.0, 1e-3, 2.0**20]),
        (0x0E, "d", [-1.5, 0.1, 0.0, 3.0, 1e-300, 1e300]),
    ],
)
@pytest.mark.parametrize("compressed", [False, True])
def test_reads_every_dtype_raw_and_gzip(tmp_path, code, fmt, values, compressed):
    raw = idx_bytes(code, (2, 3), struct.pack(f">{len(values)}{fmt}", *values))
    path = tmp_path / ("a.idx.gz" if compressed else "a.idx")
    path.write_bytes(gzip.compress(raw) if compressed else raw)
    array = read_idx(path)
    expected = np.array(struct.unpack(f">{len(values)}{fmt}", raw[12:])).reshape(2, 3)
    assert array.shape == (2, 3)
    assert array.dtype.isnative and array.flags.writeable
    np.testing.assert_array_equal(array, expected)


def test_three_dimensional_images_in_c_order(tmp_path):
    payload = bytes(range(24))
    path = tmp_path / "images-idx3-ubyte"
    path.write_bytes(idx_bytes(0x08, (2, 3, 4), payload))
    array = read_idx(str(path))
    assert array.shape == (2, 3, 4) and array.dtype == np.uint8
    assert array[1, 2, 3] == 23 and array[1, 0, 0] == 12 and array[0, 1, 0] == 4


def test_empty_dimension_is_valid(tmp_path):
    path = tmp_path / "empty"
    path.write_bytes(idx_bytes(0x08, (0, 28, 28), b""))
    assert read_idx(path).shape == (0, 28, 28)


GOOD = idx_bytes(0x08, (2, 2), bytes([1, 2, 3, 4]))


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x01\x00\x08\x02" + GOOD[4:], "bad magic number"),
        (b"\x00\x07\x08\x02" + GOOD[4:], "bad magic number"),
        (b"\x00\x00\x07\x02" + GOOD[4:], "unknown IDX dtype code 0x07"),
        (b"\x00\x00\x08\x00", "0 dimensions"),
        (b"\x00\x00", "shorter than the 4-byte magic"),
        (GOOD[:10], "truncated: its header announces 2 dimensions"),
        (GOOD[:-1], "truncated: dims (2, 2) of uint8 need 4 data bytes, found 3"),
        (GOOD + b"\x00\x00", "2 trailing bytes"),
        (idx_bytes(0x0C, (3,), b"\x00" * 11), "need 12 data bytes, found 11"),
    ],
)
def test_corrupt_files_raise_value_error_naming_file(tmp_path, content, message):
    for path, data in ((tmp_path / "bad-idx", content), (tmp_path / "bad-idx.gz", gzip.compress(content))):
        path.write_bytes(data)
        with pytest.raises(ValueError, match=re.escape(message)) as info:
            read_idx(path)
        assert str(path) in str(info.value)


def test_truncated_gzip_stream(tmp_path):
    path = tmp_path / "cut.gz"
    path.write_bytes(gzip.compress(GOOD * 50)[:-12])
    with pytest.raises(ValueError, match="damaged gzip") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_gzip_with_damaged_payload(tmp_path):
    blob = bytearray(gzip.compress(bytes(range(256)) * 40))
    blob[20:40] = b"\xff" * 20
    path = tmp_path / "garbled.gz"
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="damaged gzip"):
        read_idx(path)


def test_gz_name_without_gzip_content(tmp_path):
    path = tmp_path / "labels-idx1-ubyte.gz"
    path.write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(ValueError, match="not gzip-compressed") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nope")


@pytest.mark.parametrize("name", ["train-images-idx3-ubyte", "train-images-idx3-ubyte.gz"])
def test_empty_file_says_it_is_empty(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"is empty \(0 bytes\)") as info:
        read_idx(path)
    assert str(path) in str(info.value)
