"""Atomic file replacement: readers see the old content or the new one, never a partial file or a leftover."""

import json
import os

import pytest

from hf_blockem.atomic_write import atomic_write, write_json_atomic


def test_a_failed_write_keeps_the_old_content_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "blockem_config.json"
    write_json_atomic(path, {"b": 1, "a": [1, 2]})
    assert path.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'

    def fail_halfway(tmp):
        with open(tmp, "w") as handle:
            handle.write('{"partial": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail_halfway)
    assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["blockem_config.json"]
    write_json_atomic(path, {"c": 3})
    assert json.loads(path.read_text()) == {"c": 3} and len(list(tmp_path.iterdir())) == 1
    # Created like any other file (umask applies), not with a temporary file's private mode.
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
