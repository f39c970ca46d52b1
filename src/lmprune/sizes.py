"""Checkpoint size on disk and compressed size of the weights, per codec.

Pruning by zeroing weights does not shrink a dense ``.safetensors`` file, because every
zero still takes its 2 or 4 bytes. It does make the file more compressible, which is what
:func:`measure_checkpoint` measures. Files are compressed in a stream of fixed-size chunks
and the compressed output is counted and discarded, so memory use does not grow with the
file size and no compressed file is written.
"""

from __future__ import annotations

import bz2
import dataclasses
import lzma
import os
import time
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import zstandard

CODECS = ("gzip", "bz2", "xz", "zstd")

# Inclusive (min, max) compression level of each codec. zstd also has negative "fast"
# levels, which are rejected here. Its levels 20 to 22 need much more memory than 19.
LEVEL_RANGES: dict[str, tuple[int, int]] = {
    "gzip": (1, 9),
    "bz2": (1, 9),
    "xz": (0, 9),
    "zstd": (1, 22),
}

DEFAULT_CHUNK_BYTES = 16 * 2**20

_MIB = 2**20


class _StreamCompressor(Protocol):
    def compress(self, data: Any, /) -> bytes: ...

    def flush(self) -> bytes: ...


@dataclasses.dataclass(frozen=True)
class CompressionResult:
    """Compressed size and speed of one codec at one level on one or more files.

    ``ratio`` is ``input_bytes / compressed_bytes``, so 2.0 means half the size.
    ``seconds`` is wall-clock time including reading the input from disk, and
    ``throughput_mib_s`` is input MiB (2**20 bytes) per second of that time.
    """

    codec: str
    level: int
    input_bytes: int
    compressed_bytes: int
    ratio: float
    seconds: float
    throughput_mib_s: float

    @classmethod
    def from_totals(
        cls, codec: str, level: int, input_bytes: int, compressed_bytes: int, seconds: float
    ) -> CompressionResult:
        """Build a result from byte counts and time, deriving ratio and throughput."""
        throughput = input_bytes / _MIB / seconds if seconds > 0 else 0.0
        return cls(
            codec=codec,
            level=level,
            input_bytes=input_bytes,
            compressed_bytes=compressed_bytes,
            ratio=input_bytes / compressed_bytes,
            seconds=seconds,
            throughput_mib_s=throughput,
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-ready dict."""
        return dataclasses.asdict(self)


def validate_codec_level(codec: str, level: int) -> None:
    """Raise ``ValueError`` unless ``codec`` is in ``CODECS`` and ``level`` is in its range."""
    if codec not in LEVEL_RANGES:
        raise ValueError(f"invalid codec {codec!r}: expected one of {', '.join(CODECS)}")

    low, high = LEVEL_RANGES[codec]
    if isinstance(level, bool) or not isinstance(level, int):
        raise ValueError(
            f"invalid {codec} level {level!r}: expected an integer from {low} to {high}"
        )
    if not low <= level <= high:
        raise ValueError(f"invalid {codec} level {level}: expected an integer from {low} to {high}")


def validate_chunk_bytes(chunk_bytes: int) -> None:
    """Raise ``ValueError`` unless ``chunk_bytes`` is a positive integer."""
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise ValueError(f"invalid chunk_bytes {chunk_bytes!r}: expected a positive integer")


def _new_compressor(codec: str, level: int, input_bytes: int) -> _StreamCompressor:
    """Create a streaming compressor whose output matches the codec's usual file format.

    gzip is the gzip container written by zlib (10-byte header without file name or
    mtime), so its size equals ``gzip.compress(data, level, mtime=0)``. xz is the .xz
    container with the default CRC64 check, as ``lzma.compress(data, preset=level)``.
    zstd is one single-threaded frame with the content size in its header.
    """
    if codec == "gzip":
        return zlib.compressobj(level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    if codec == "bz2":
        return bz2.BZ2Compressor(level)
    if codec == "xz":
        return lzma.LZMACompressor(format=lzma.FORMAT_XZ, preset=level)
    if codec == "zstd":
        # NOTE: zstd streaming output can be slightly larger than the one-shot
        # ZstdCompressor.compress() of the same bytes (about 0.5% on a 12 MB float32
        # tensor with 90% zeros, zstandard 0.25). It does not depend on the chunk size.
        return zstandard.ZstdCompressor(level=level).compressobj(size=input_bytes)
    raise ValueError(f"invalid codec {codec!r}: expected one of {', '.join(CODECS)}")


def compress_file(
    path: str | os.PathLike[str],
    codec: str,
    level: int,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> CompressionResult:
    """Compress the file at ``path`` in memory and return its compressed size and speed.

    The file is read ``chunk_bytes`` at a time into one reused buffer and fed to a
    streaming compressor. Compressed output is counted and discarded, so memory use is
    about ``chunk_bytes`` plus the compressor's own state, which for xz at level 9 is
    674 MiB (``xz -9 -vv``, xz 5.4). The file is not modified.

    Raises ``ValueError`` for an unknown codec, a level outside the codec's range or a
    ``chunk_bytes`` below 1, and ``FileNotFoundError`` when ``path`` does not exist.
    """
    validate_codec_level(codec, level)
    validate_chunk_bytes(chunk_bytes)

    path = Path(path)
    input_bytes = path.stat().st_size
    buffer = bytearray(min(chunk_bytes, max(input_bytes, 1)))
    view = memoryview(buffer)
    read_bytes = 0
    compressed_bytes = 0

    start = time.perf_counter()
    compressor = _new_compressor(codec, level, input_bytes)
    with open(path, "rb", buffering=0) as stream:
        while True:
            count = stream.readinto(buffer)
            if not count:
                break
            read_bytes += count
            compressed_bytes += len(compressor.compress(view[:count]))
    compressed_bytes += len(compressor.flush())
    seconds = time.perf_counter() - start

    if read_bytes != input_bytes:
        raise RuntimeError(
            f"{path} changed size while it was compressed ({input_bytes} bytes before, "
            f"{read_bytes} bytes read). Rerun when no other process writes to it"
        )
    return CompressionResult.from_totals(codec, level, input_bytes, compressed_bytes, seconds)


def _list_files(folder: Path) -> list[Path]:
    """Return every regular file under ``folder``, recursively, in sorted order."""
    return sorted(path for path in folder.rglob("*") if path.is_file())


def measure_checkpoint(
    checkpoint_dir: str | os.PathLike[str],
    codecs: Mapping[str, int],
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> dict[str, Any]:
    """Measure the file sizes of a checkpoint folder and the compressed size of its weights.

    ``codecs`` maps codec name to level, for example ``{"zstd": 3, "xz": 6}``. All names
    and levels are checked before any file is compressed. Every ``*.safetensors`` file in
    the folder is compressed separately, and each codec's numbers are sums over those
    files. Sizes are file sizes (``st_size``), not allocated disk blocks. Returns::

        {
          "checkpoint_dir": str,
          "files": {relative posix path: bytes, ...},   # every file, recursively
          "total_bytes": int,                           # sum of "files"
          "weights_files": [relative posix path, ...],  # the *.safetensors files
          "weights_bytes": int,                         # their uncompressed total
          "chunk_bytes": int,
          "codecs": {codec: CompressionResult.to_dict(), ...},  # in argument order
        }

    Raises ``FileNotFoundError`` when the folder is missing or contains no
    ``*.safetensors`` file, and ``NotADirectoryError`` when ``checkpoint_dir`` is a file.
    """
    for codec, level in codecs.items():
        validate_codec_level(codec, level)
    validate_chunk_bytes(chunk_bytes)

    folder = Path(checkpoint_dir)
    if not folder.exists():
        raise FileNotFoundError(
            f"checkpoint folder {folder} not found. It should be a checkpoint folder "
            "written by the prune rule"
        )
    if not folder.is_dir():
        raise NotADirectoryError(
            f"checkpoint path {folder} is not a folder. It should be a checkpoint folder "
            "written by the prune rule"
        )

    files = _list_files(folder)
    weights_files = [path for path in files if path.suffix == ".safetensors"]
    if not weights_files:
        raise FileNotFoundError(
            f"no *.safetensors file in {folder}. It should be a checkpoint folder "
            "written by the prune rule"
        )

    file_bytes = {path.relative_to(folder).as_posix(): path.stat().st_size for path in files}
    weights_bytes = sum(path.stat().st_size for path in weights_files)

    codec_results = {}
    for codec, level in codecs.items():
        results = [compress_file(path, codec, level, chunk_bytes) for path in weights_files]
        codec_results[codec] = CompressionResult.from_totals(
            codec,
            level,
            input_bytes=sum(result.input_bytes for result in results),
            compressed_bytes=sum(result.compressed_bytes for result in results),
            seconds=sum(result.seconds for result in results),
        ).to_dict()

    return {
        "checkpoint_dir": str(folder),
        "files": file_bytes,
        "total_bytes": sum(file_bytes.values()),
        "weights_files": [path.relative_to(folder).as_posix() for path in weights_files],
        "weights_bytes": weights_bytes,
        "chunk_bytes": chunk_bytes,
        "codecs": codec_results,
    }
