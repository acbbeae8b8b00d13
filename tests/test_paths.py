"""Paths a user names are confined: compare and export delete or replace only dirs they marked as
their own; names with '..', '/' or an absolute path are refused; symlinks are never followed into a
delete. Nothing outside the named dirs changes."""

from __future__ import annotations

import pytest

from hybridtune import compare, paths
from hybridtune.errors import UserError
from hybridtune.export import MARKER as EXPORT_MARKER
from hybridtune.export import export

from .refusal import snapshot


@pytest.mark.parametrize("name", ["../x", "../../etc", "/abs", "a/b", ".hidden", "", "x" * 300, "a\x00b"])
def test_unsafe_names_are_refused(name):
    assert not paths.is_safe_name(name)
    with pytest.raises(UserError, match="letters, digits"):
        paths.check_name(name, "output.name")


@pytest.mark.parametrize("name", ["run", "lora-r16", "a.b_c-1", "0"])
def test_plain_names_pass(name):
    assert paths.check_name(name, "output.name") == name


def test_claim_refuses_what_is_not_its_own_and_marks_what_it_creates(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "data.txt").write_text("mine")
    (tmp_path / "link").symlink_to(outside)
    (tmp_path / "file").write_text("x")
    before = snapshot(tmp_path)
    for target, says in [
        (outside, "not a compare dir"),
        (tmp_path / "link", "symbolic link"),
        (tmp_path / "file", "a file"),
    ]:
        with pytest.raises(UserError, match=says):
            paths.claim(target, compare.MARKER, "compare dir", "--out")
    assert snapshot(tmp_path) == before
    new = paths.claim(tmp_path / "new", compare.MARKER, "compare dir", "--out")
    assert (new / compare.MARKER).is_file() and paths.owned(new, compare.MARKER)
    assert paths.claim(new, compare.MARKER, "compare dir", "--out") == new  # its own: accepted again


def test_compare_starts_over_only_real_dirs_inside_its_runs(tmp_path):
    root = paths.claim(tmp_path / "cmp", compare.MARKER, "compare dir", "--out")
    runs = root / "runs"
    runs.mkdir()
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    (runs / "lora-s42").symlink_to(outside)  # a link planted where a run dir goes
    with pytest.raises(UserError, match="a link or a file"):
        compare._start_over(runs / "lora-s42", runs)
    assert (outside / "keep.txt").read_text() == "keep"
    (runs / "lora-s42").unlink()
    (runs / "lora-s42").mkdir()
    (runs / "lora-s42" / "half.bin").write_text("x")
    compare._start_over(runs / "lora-s42", runs)  # an unfinished run of ours: removed
    assert not (runs / "lora-s42").exists() and (outside / "keep.txt").is_file()


def test_compare_refuses_an_unmarked_out_dir_before_writing(tmp_path, tiny_bert):
    (tmp_path / "r.yaml").write_text(f"name: r\nmodel: {tiny_bert}\ntrain: {{max_steps: 2}}\n")
    (tmp_path / "s.yaml").write_text("strategies: [r.yaml]\n")
    work = tmp_path / "work"
    (work / "cache").mkdir(parents=True)
    (work / "cache" / "thesis.tex").write_text("years")
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match="not a compare dir"):
        compare.compare(str(tmp_path / "s.yaml"), str(work))
    assert snapshot(tmp_path) == before


def test_export_replaces_only_its_own_export(trained_run, tmp_path, monkeypatch):
    run = trained_run("full")
    out = tmp_path / "exp"
    export(str(run), "merged", str(out))
    assert (out / EXPORT_MARKER).is_file() and (out / "export.json").is_file()
    export(str(run), "merged", str(out))  # an earlier export of ours: replaced
    assert (out / EXPORT_MARKER).is_file()
    (out / EXPORT_MARKER).unlink()  # now it is no longer provably ours
    (out / "notes.txt").write_text("added by the user")
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match="not an export"):
        export(str(run), "merged", str(out))
    assert snapshot(tmp_path) == before
    # '.' resolves to a named dir: an empty cwd is a fine target, no traceback
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    export(str(run), "merged", ".")
    assert (empty / EXPORT_MARKER).is_file()
