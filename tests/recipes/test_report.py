"""``save_atomically``: the one way the recipes write run files; and the report's reading
of a run's logged metrics."""

import os

import pytest

from gblr.files import save_atomically


def test_save_atomically_writes_text_and_bytes_with_plain_permissions(tmp_path):
    save_atomically(lambda f: f.write("a\nb\n"), tmp_path / "sub" / "t.md", text=True)
    save_atomically(lambda f: f.write(b"\x00\x01"), tmp_path / "b.bin")
    assert (tmp_path / "sub" / "t.md").read_text() == "a\nb\n"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "b.bin").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")

    def failing(handle):
        handle.write("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_atomically(failing, path, text=True)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_metrics_of_older_run_folders_are_read_under_the_current_names(tmp_path):
    """The learner's summary said ``mac_ratio`` before it said ``macs_ratio``; a run
    folder of then still gets its MACs curve in the report."""
    from gblr.recipes.report import _read_metrics

    (tmp_path / "metrics.csv").write_text("step,gblr/mac_ratio,train/loss\n1,0.5,2.0\n2,0.4,\n")
    series = _read_metrics(tmp_path)
    assert series == {"gblr/macs_ratio": [(1.0, 0.5), (2.0, 0.4)], "train/loss": [(1.0, 2.0)]}
