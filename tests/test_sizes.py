import bz2
import gzip
import json
import lzma
import tracemalloc

import matplotlib.image
import pandas as pd
import pytest
import torch
import zstandard
from safetensors.torch import save_file

from lmprune.io import write_json_atomic
from lmprune.plots import TABLE_COLUMNS, plot_size_vs_sparsity, size_table
from lmprune.sizes import (
    CODECS,
    LEVEL_RANGES,
    CompressionResult,
    compress_file,
    measure_checkpoint,
)

# Low to middle levels keep the whole file fast on a small shared machine.
TEST_LEVELS = {"gzip": 6, "bz2": 9, "xz": 1, "zstd": 3}
NUMEL = 256 * 1024  # 1 MiB of float32 per tensor


def _dense_tensor(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(512, NUMEL // 512, generator=generator) * 0.02


def _pruned_tensor(fraction_zero=0.9, seed=0):
    tensor = _dense_tensor(seed)
    flat = tensor.view(-1)
    smallest = flat.abs().argsort()[: int(fraction_zero * flat.numel())]
    flat[smallest] = 0.0
    return tensor


def _write_checkpoint(folder, tensor, shards=1):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "gpt2"}\n', encoding="utf-8")
    (folder / "tokenizer.json").write_text('{"version": "1.0"}\n', encoding="utf-8")
    if shards == 1:
        save_file({"weight": tensor.contiguous()}, folder / "model.safetensors")
    else:
        for shard, part in enumerate(tensor.chunk(shards)):
            name = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
            save_file({f"weight.{shard}": part.contiguous()}, folder / name)
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    dense = folder / "dense.safetensors"
    pruned = folder / "pruned.safetensors"
    save_file({"weight": _dense_tensor()}, dense)
    save_file({"weight": _pruned_tensor()}, pruned)
    return {"dense": dense, "pruned": pruned}


def _one_shot_size(data, codec, level):
    if codec == "gzip":
        return len(gzip.compress(data, compresslevel=level, mtime=0))
    if codec == "bz2":
        return len(bz2.compress(data, compresslevel=level))
    if codec == "xz":
        return len(lzma.compress(data, preset=level))
    return len(zstandard.ZstdCompressor(level=level).compress(data))


def test_zeros_do_not_shrink_raw_file(files):
    assert files["pruned"].stat().st_size == files["dense"].stat().st_size


@pytest.mark.parametrize("codec", CODECS)
def test_zeros_compress_much_better(files, codec):
    dense = compress_file(files["dense"], codec, TEST_LEVELS[codec])
    pruned = compress_file(files["pruned"], codec, TEST_LEVELS[codec])

    assert pruned.input_bytes == dense.input_bytes
    assert pruned.compressed_bytes < 0.5 * dense.compressed_bytes
    assert pruned.ratio > 2.0 * dense.ratio


@pytest.mark.parametrize("codec", CODECS)
def test_streamed_size_matches_one_shot(files, codec):
    data = files["pruned"].read_bytes()
    level = TEST_LEVELS[codec]

    result = compress_file(files["pruned"], codec, level, chunk_bytes=100_000)
    expected = _one_shot_size(data, codec, level)

    if codec == "zstd":
        # zstd's streaming frames can be slightly larger than its one-shot output.
        assert abs(result.compressed_bytes - expected) <= 0.01 * expected
    else:
        assert result.compressed_bytes == expected


@pytest.mark.parametrize("codec", CODECS)
def test_chunk_size_does_not_change_result(files, codec):
    level = TEST_LEVELS[codec]

    one_chunk = compress_file(files["pruned"], codec, level, chunk_bytes=2**24)
    small_chunks = compress_file(files["pruned"], codec, level, chunk_bytes=64 * 1024 + 3)

    assert small_chunks.compressed_bytes == one_chunk.compressed_bytes


def test_compression_result_fields(files):
    result = compress_file(files["pruned"], "zstd", 3)

    assert result.codec == "zstd"
    assert result.level == 3
    assert result.input_bytes == files["pruned"].stat().st_size
    assert result.ratio == pytest.approx(result.input_bytes / result.compressed_bytes)
    assert result.seconds > 0
    assert result.throughput_mib_s == pytest.approx(
        result.input_bytes / 2**20 / result.seconds
    )
    assert set(result.to_dict()) == {
        "codec", "level", "input_bytes", "compressed_bytes", "ratio", "seconds",
        "throughput_mib_s",
    }


def test_compress_file_memory_stays_near_chunk(tmp_path):
    path = tmp_path / "big.safetensors"
    save_file({"weight": _pruned_tensor().repeat(8, 1)}, path)  # 8 MiB
    chunk_bytes = 256 * 1024

    tracemalloc.start()
    try:
        compress_file(path, "gzip", 1, chunk_bytes=chunk_bytes)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert path.stat().st_size > 8 * 2**20
    assert peak < 4 * chunk_bytes


def test_compress_empty_file(tmp_path):
    path = tmp_path / "empty.bin"
    path.write_bytes(b"")

    result = compress_file(path, "zstd", 3)

    assert result.input_bytes == 0
    assert result.compressed_bytes > 0
    assert result.ratio == 0.0


@pytest.mark.parametrize(
    ("codec", "level"),
    [
        ("gzip", 0), ("gzip", 10), ("bz2", 0), ("bz2", 10),
        ("xz", -1), ("xz", 10), ("zstd", 0), ("zstd", 23),
    ],
)
def test_level_out_of_range_rejected(files, codec, level):
    low, high = LEVEL_RANGES[codec]

    with pytest.raises(ValueError, match=f"invalid {codec} level {level}") as error:
        compress_file(files["pruned"], codec, level)

    assert f"from {low} to {high}" in str(error.value)


@pytest.mark.parametrize("codec", CODECS)
def test_level_range_edges_accepted(tmp_path, codec):
    path = tmp_path / "small.bin"
    path.write_bytes(bytes(1000))
    low, high = LEVEL_RANGES[codec]

    for level in (low, high):
        assert compress_file(path, codec, level).level == level


@pytest.mark.parametrize("level", ["3", 3.0, True, None])
def test_non_integer_level_rejected(files, level):
    with pytest.raises(ValueError, match="expected an integer from 1 to 22"):
        compress_file(files["pruned"], "zstd", level)


def test_unknown_codec_rejected(files):
    expected = "invalid codec 'lz4': expected one of gzip, bz2, xz, zstd"
    with pytest.raises(ValueError, match=expected):
        compress_file(files["pruned"], "lz4", 1)


@pytest.mark.parametrize("chunk_bytes", [0, -1, 1.5])
def test_invalid_chunk_bytes_rejected(files, chunk_bytes):
    with pytest.raises(ValueError, match="invalid chunk_bytes"):
        compress_file(files["pruned"], "zstd", 3, chunk_bytes=chunk_bytes)


def test_compress_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        compress_file(tmp_path / "missing.safetensors", "zstd", 3)


def test_measure_checkpoint_keys_and_sizes(tmp_path):
    folder = _write_checkpoint(tmp_path / "ckpt", _pruned_tensor())
    codecs = {"zstd": 3, "gzip": 6}

    result = measure_checkpoint(folder, codecs)

    assert set(result) == {
        "checkpoint_dir", "files", "total_bytes", "weights_files", "weights_bytes",
        "chunk_bytes", "codecs",
    }
    assert result["checkpoint_dir"] == str(folder)
    assert result["files"] == {
        "config.json": (folder / "config.json").stat().st_size,
        "model.safetensors": (folder / "model.safetensors").stat().st_size,
        "tokenizer.json": (folder / "tokenizer.json").stat().st_size,
    }
    assert result["total_bytes"] == sum(result["files"].values())
    assert result["weights_files"] == ["model.safetensors"]
    assert result["weights_bytes"] == result["files"]["model.safetensors"]
    assert list(result["codecs"]) == ["zstd", "gzip"]

    for codec, level in codecs.items():
        entry = result["codecs"][codec]
        expected = compress_file(folder / "model.safetensors", codec, level)
        assert entry["level"] == level
        assert entry["input_bytes"] == result["weights_bytes"]
        assert entry["compressed_bytes"] == expected.compressed_bytes
        assert entry["ratio"] == pytest.approx(result["weights_bytes"] / entry["compressed_bytes"])

    assert json.loads(json.dumps(result)) == result


def test_measure_checkpoint_sums_shards(tmp_path):
    tensor = _pruned_tensor()
    folder = _write_checkpoint(tmp_path / "sharded", tensor, shards=2)

    result = measure_checkpoint(folder, {"bz2": 9})

    shards = sorted(path.name for path in folder.glob("*.safetensors"))
    assert result["weights_files"] == shards
    assert result["weights_bytes"] == sum((folder / name).stat().st_size for name in shards)
    expected = sum(compress_file(folder / name, "bz2", 9).compressed_bytes for name in shards)
    assert result["codecs"]["bz2"]["compressed_bytes"] == expected


def test_measure_checkpoint_without_codecs(tmp_path):
    folder = _write_checkpoint(tmp_path / "ckpt", _dense_tensor())

    result = measure_checkpoint(folder, {})

    assert result["codecs"] == {}
    assert result["weights_bytes"] > 4 * NUMEL


def test_measure_checkpoint_missing_folder(tmp_path):
    folder = tmp_path / "not-pruned-yet"

    with pytest.raises(FileNotFoundError, match="prune rule") as error:
        measure_checkpoint(folder, {"zstd": 3})

    assert str(folder) in str(error.value)


def test_measure_checkpoint_without_safetensors(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text("{}", encoding="utf-8")
    (folder / "pytorch_model.bin").write_bytes(b"\0" * 100)

    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors file") as error:
        measure_checkpoint(folder, {"zstd": 3})

    assert str(folder) in str(error.value)
    assert "prune rule" in str(error.value)


def test_measure_checkpoint_file_instead_of_folder(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"weight": torch.zeros(4)}, path)

    with pytest.raises(NotADirectoryError, match="is not a folder"):
        measure_checkpoint(path, {"zstd": 3})


def test_measure_checkpoint_checks_codecs_first(tmp_path):
    with pytest.raises(ValueError, match="invalid xz level 12"):
        measure_checkpoint(tmp_path / "missing", {"zstd": 3, "xz": 12})


# size_table and plot_size_vs_sparsity


def _size_record(model, method, sparsity, weights_bytes, compressed):
    return {
        "weights_bytes": weights_bytes,
        "codecs": {
            codec: {"level": TEST_LEVELS[codec], "compressed_bytes": size,
                    "ratio": weights_bytes / size}
            for codec, size in compressed.items()
        },
        "model": model,
        "method": method,
        "sparsity": sparsity,
    }


@pytest.fixture(scope="module")
def measured_records(tmp_path_factory):
    records = []
    for sparsity in (0.0, 0.5, 0.9):
        tensor = _pruned_tensor(sparsity) if sparsity else _dense_tensor()
        folder = _write_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt", tensor)
        result = measure_checkpoint(folder, {"gzip": 1, "zstd": 3})
        records.append(result | {"model": "tiny", "method": "magnitude", "sparsity": sparsity})
    return records


def test_size_table_from_measured_records(measured_records):
    table = size_table(measured_records)

    assert list(table.columns) == list(TABLE_COLUMNS)
    assert len(table) == 3 * 3
    assert list(table["codec"][:3]) == ["raw", "gzip", "zstd"]
    raw = table[table["codec"] == "raw"]
    assert list(raw["sparsity"]) == [0.0, 0.5, 0.9]
    assert raw["level"].isna().all()
    assert (raw["ratio"] == 1.0).all()
    assert list(raw["bytes"]) == [record["weights_bytes"] for record in measured_records]
    zstd = table[table["codec"] == "zstd"]
    assert list(zstd["level"]) == [3, 3, 3]
    assert zstd["bytes"].is_monotonic_decreasing


def test_size_table_sorts_by_sparsity():
    records = [
        _size_record("m", "magnitude", 0.9, 1000, {"zstd": 200}),
        _size_record("m", "magnitude", 0.1, 1000, {"zstd": 900}),
    ]

    table = size_table(records)

    assert list(table["sparsity"]) == [0.1, 0.1, 0.9, 0.9]


def test_size_table_missing_key_rejected():
    record = _size_record("m", "magnitude", 0.5, 1000, {"zstd": 500})
    del record["method"]

    with pytest.raises(ValueError, match=r"size record 0 is missing the keys \['method'\]"):
        size_table([record])


def test_size_table_percent_sparsity_rejected():
    record = _size_record("m", "magnitude", 50, 1000, {"zstd": 500})

    with pytest.raises(ValueError, match="invalid sparsity 50.0 in size record 0"):
        size_table([record])


def test_plot_size_vs_sparsity_writes_png(tmp_path, measured_records):
    records = list(measured_records)
    records += [record | {"model": "other"} for record in measured_records]
    path = tmp_path / "figures" / "sizes.png"

    plot_size_vs_sparsity(size_table(records), path)

    image = matplotlib.image.imread(path)
    height, width = image.shape[:2]
    assert width > height > 200
    assert [p.name for p in path.parent.iterdir()] == ["sizes.png"]


def test_plot_size_vs_sparsity_several_methods(tmp_path):
    records = [
        _size_record("m", method, sparsity, 1000, {"zstd": int(1000 * (1 - sparsity)) + 50})
        for method in ("magnitude", "random")
        for sparsity in (0.0, 0.5)
    ]
    path = tmp_path / "sizes.pdf"

    plot_size_vs_sparsity(size_table(records), path)

    assert path.read_bytes().startswith(b"%PDF")


def test_plot_size_vs_sparsity_missing_column(tmp_path):
    table = pd.DataFrame({"model": ["m"], "sparsity": [0.5], "codec": ["raw"], "bytes": [1]})

    with pytest.raises(ValueError, match=r"missing the columns \['method'\]"):
        plot_size_vs_sparsity(table, tmp_path / "sizes.png")

    assert not list(tmp_path.iterdir())


def test_plot_size_vs_sparsity_empty_table(tmp_path):
    table = pd.DataFrame(columns=list(TABLE_COLUMNS))

    with pytest.raises(ValueError, match="size table is empty"):
        plot_size_vs_sparsity(table, tmp_path / "sizes.png")


def test_plot_size_vs_sparsity_duplicate_rows(tmp_path):
    record = _size_record("m", "magnitude", 0.5, 1000, {"zstd": 500})
    table = size_table([record, record])

    with pytest.raises(ValueError, match="more than one row for model='m'"):
        plot_size_vs_sparsity(table, tmp_path / "sizes.png")


def test_size_records_survive_json_file(tmp_path, measured_records):
    path = tmp_path / "sizes.json"
    write_json_atomic(path, measured_records[0])

    reloaded = json.loads(path.read_text(encoding="utf-8"))

    assert size_table([reloaded]).equals(size_table([measured_records[0]]))


def test_plot_size_vs_sparsity_from_csv(tmp_path, measured_records):
    csv_path = tmp_path / "sizes.csv"
    size_table(measured_records).to_csv(csv_path, index=False)
    path = tmp_path / "sizes.png"

    plot_size_vs_sparsity(pd.read_csv(csv_path), path)

    height, width = matplotlib.image.imread(path).shape[:2]
    assert width > height
