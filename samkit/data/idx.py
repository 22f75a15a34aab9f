"""Reader for the IDX file format (MNIST, Fashion-MNIST), raw or gzip-compressed.

The format (LeCun et al., http://yann.lecun.com/exdb/mnist/), all integers big-endian:

    bytes 0-1   0x00 0x00                       magic: always zero
    byte  2     dtype code                      0x08 uint8, 0x09 int8, 0x0B int16,
                                                0x0C int32, 0x0D float32, 0x0E float64
    byte  3     ndim                            number of dimensions (>= 1)
    then        ndim x uint32                   the size of each dimension
    then        prod(dims) x itemsize bytes     the data, row-major (C order)

`read_idx` checks every one of these and the EXACT byte count, so a truncated download, a file with
trailing bytes or a damaged gzip stream is a ValueError naming the file and what is wrong, never a
crash deep inside numpy. Written here because torchvision is not usable beside our torch build.

Example:
    >>> images = read_idx("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")  # doctest: +SKIP
    >>> images.shape, images.dtype                                                      # doctest: +SKIP
    ((10000, 28, 28), dtype('uint8'))
"""

from __future__ import annotations

import gzip
import os
import zlib
from typing import Union

import numpy as np

PathLike = Union[str, "os.PathLike[str]"]

IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: PathLike) -> bytes:
    with open(path, "rb") as f:
        raw = f.read()
    if not raw:
        raise ValueError(f"{os.fspath(path)!r} is empty (0 bytes): the file was not written or a download was "
                         "cut short; delete it and get it again")
    if not raw.startswith(_GZIP_MAGIC):
        if os.fspath(path).endswith(".gz") and raw[:2] != b"\x00\x00":
            raise ValueError(f"{os.fspath(path)!r} is named .gz but is not gzip-compressed (it starts with "
                             f"{raw[:4].hex()}): the file is damaged or not what its name says; delete it and "
                             "get it again")
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
        raise ValueError(f"{os.fspath(path)!r} is a damaged gzip file ({type(err).__name__}: {err}): "
                         "the download was probably cut short; delete it and get it again") from err


def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw) into a native-byte-order, writable numpy array.

    Raises FileNotFoundError when ``path`` does not exist and ValueError, naming the file, when its
    content is not a valid IDX file (bad magic number, unknown dtype code, no dimensions, header or data
    shorter than announced, trailing bytes, damaged gzip stream).
    """
    name = os.fspath(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(f"{name!r} is not an IDX file: {len(data)} bytes, shorter than the 4-byte magic number")
    if data[0] != 0 or data[1] != 0:
        raise ValueError(f"{name!r} is not an IDX file: bad magic number {data[:4].hex()} "
                         "(the first two bytes must be 00 00)")
    code, ndim = data[2], data[3]
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise ValueError(f"{name!r} has an unknown IDX dtype code 0x{code:02X} (known codes: {known})")
    if ndim == 0:
        raise ValueError(f"{name!r} declares 0 dimensions; an IDX file needs at least 1")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{name!r} is truncated: its header announces {ndim} dimensions ({header} header "
                         f"bytes) but the file holds only {len(data)} bytes")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    found = len(data) - header
    if found < expected:
        raise ValueError(f"{name!r} is truncated: dims {dims} of {dtype.name} need {expected} data bytes, "
                         f"found {found}")
    if found > expected:
        raise ValueError(f"{name!r} has {found - expected} trailing bytes after the {expected} data bytes "
                         f"announced by dims {dims}: the file is damaged or not an IDX file")
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=True)
