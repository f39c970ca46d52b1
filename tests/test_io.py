import json
import os
import stat

import pytest

from lmprune.io import atomic_output_path, write_json_atomic


def _folder_names(folder):
    return sorted(path.name for path in folder.iterdir())


def test_write_json_atomic_round_trip(tmp_path):
    path = tmp_path / "metrics.json"
    obj = {"model": "gpt2", "sparsity": 0.5, "sizes": [1, 2, 3]}

    write_json_atomic(path, obj)

    assert json.loads(path.read_text(encoding="utf-8")) == obj
    assert path.read_text(encoding="utf-8").endswith("}\n")
    assert _folder_names(tmp_path) == ["metrics.json"]


def test_write_json_atomic_replaces_existing(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old", encoding="utf-8")

    write_json_atomic(path, {"new": True})

    assert json.loads(path.read_text(encoding="utf-8")) == {"new": True}


def test_write_json_atomic_unserialisable_leaves_nothing(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text('{"old": 1}', encoding="utf-8")

    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})

    assert path.read_text(encoding="utf-8") == '{"old": 1}'
    assert _folder_names(tmp_path) == ["metrics.json"]


def test_write_json_atomic_creates_parent_folders(tmp_path):
    path = tmp_path / "a" / "b" / "metrics.json"

    write_json_atomic(path, [1])

    assert json.loads(path.read_text(encoding="utf-8")) == [1]


def test_temp_path_hidden_with_suffix(tmp_path):
    path = tmp_path / "figure.png"

    with atomic_output_path(path) as temp_path:
        assert temp_path.parent == tmp_path
        assert temp_path.name.startswith(".figure.png.")
        assert temp_path.suffix == ".png"
        assert temp_path.exists()
        assert not path.exists()
        temp_path.write_bytes(b"png bytes")

    assert path.read_bytes() == b"png bytes"
    assert _folder_names(tmp_path) == ["figure.png"]


def test_atomic_output_path_error_keeps_old_file(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("old\n", encoding="utf-8")

    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic_output_path(path) as temp_path:
            temp_path.write_text("half-writ", encoding="utf-8")
            raise RuntimeError("writer failed")

    assert path.read_text(encoding="utf-8") == "old\n"
    assert _folder_names(tmp_path) == ["table.csv"]


def test_atomic_output_path_error_creates_nothing(tmp_path):
    path = tmp_path / "table.csv"

    with pytest.raises(KeyboardInterrupt):
        with atomic_output_path(path) as temp_path:
            temp_path.write_text("partial", encoding="utf-8")
            raise KeyboardInterrupt

    assert _folder_names(tmp_path) == []


def test_atomic_output_path_mode_follows_umask(tmp_path):
    path = tmp_path / "table.csv"
    old_umask = os.umask(0o027)
    try:
        with atomic_output_path(path) as temp_path:
            temp_path.write_text("a,b\n", encoding="utf-8")
    finally:
        os.umask(old_umask)

    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_atomic_output_path_accepts_str(tmp_path):
    path = str(tmp_path / "out.txt")

    with atomic_output_path(path) as temp_path:
        temp_path.write_text("done", encoding="utf-8")

    assert open(path, encoding="utf-8").read() == "done"
