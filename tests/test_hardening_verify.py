"""Issue 23, item 6: `calm verify --repair` re-links intact shards whose files were swapped or renamed
instead of dropping their rows, never empties what a resume would keep, and says "missing" for a
missing shard."""

from __future__ import annotations

from click.testing import CliRunner

from calm.cli import main
from calm.store import load_features, verify_store
from tests.test_faults import clips, key_dir, reference, shards  # noqa: F401  (fixtures)
from tests.test_store import FakeExtractor, assert_same_store, run


def swap(a, b) -> None:
    tmp = a.with_name("swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


def test_swapped_shards_are_relinked_not_dropped(tmp_path, clips, reference):  # noqa: F811
    out = tmp_path / "store"
    run(FakeExtractor(), clips, out)
    a, b = shards(out)[:2]
    swap(a, b)
    found = verify_store(out)[0]
    assert len(found.problems) == 2 and all("shards swapped or renamed" in p for p in found.problems)
    res = CliRunner().invoke(main, ["verify", str(out), "--repair"])
    assert res.exit_code == 0, res.output
    assert "their rows now point at it" in res.output and "moved aside" not in res.output
    assert "extracted again" not in res.output
    assert not list(key_dir(out).rglob("*.corrupt"))
    assert verify_store(out, full=True)[0].ok
    assert run(FakeExtractor(), clips, out).stored == 0  # nothing to redo
    assert_same_store(out, reference)


def test_a_store_of_two_swapped_shards_keeps_every_row(tmp_path, clips, reference):  # noqa: F811
    """The case of the issue: repair re-links both shards."""
    out = tmp_path / "store"
    run(FakeExtractor(), clips[:6], out)
    a, b = shards(out)
    swap(a, b)
    report = verify_store(out, repair=True)[0]
    assert report.rows == 6 and not report.dropped
    assert len(load_features(out)[0]) == 6
    assert run(FakeExtractor(), clips, out).stored == len(clips) - 6
    assert_same_store(out, reference)


def test_resume_relinks_swapped_shards_like_repair(tmp_path, clips, reference, caplog):  # noqa: F811
    """A resume does what `verify --repair` does with swapped shards: re-links, redoes nothing,
    even when every shard of the store is swapped (it used to refuse to empty the index)."""
    out = tmp_path / "store"
    run(FakeExtractor(), clips[:6], out)
    a, b = shards(out)
    swap(a, b)
    with caplog.at_level("WARNING", logger="calm.store"):
        report = run(FakeExtractor(), clips[:6], out)
    assert report.redone == 0 and report.stored == 0
    assert sum("swapped or renamed" in r.getMessage() for r in caplog.records) == 2
    assert not list(key_dir(out).rglob("*.corrupt"))
    assert verify_store(out, full=True)[0].ok
    assert run(FakeExtractor(), clips, out).stored == len(clips) - 6
    assert_same_store(out, reference)


def test_resume_finds_a_renamed_shard_instead_of_deleting_it(tmp_path, clips, reference):  # noqa: F811
    out = tmp_path / "store"
    run(FakeExtractor(), clips, out)
    victim = shards(out)[1]
    moved = victim.with_name("shard-000099.safetensors")
    victim.rename(moved)
    assert run(FakeExtractor(), clips, out).redone == 0
    assert moved.exists() and verify_store(out, full=True)[0].ok
    assert_same_store(out, reference)


def test_a_renamed_shard_is_found_under_its_new_name(tmp_path, clips, reference):  # noqa: F811
    out = tmp_path / "store"
    run(FakeExtractor(), clips, out)
    victim = shards(out)[1]
    victim.rename(victim.with_name("shard-000099.safetensors"))
    report = verify_store(out, repair=True)[0]
    assert not report.dropped and report.rows == len(clips)
    assert any("shard-000099.safetensors: holds the 3 clips" in r for r in report.repaired)
    assert run(FakeExtractor(), clips, out).stored == 0
    assert_same_store(out, reference)


def test_a_missing_shard_is_reported_missing_not_moved_aside(tmp_path, clips, reference):  # noqa: F811
    out = tmp_path / "store"
    run(FakeExtractor(), clips, out)
    victim = shards(out)[2]
    victim.unlink()
    res = CliRunner().invoke(main, ["verify", str(out), "--repair"])
    assert res.exit_code == 0, res.output
    assert f"{victim}: missing; its 3 rows are dropped" in res.output and "moved aside" not in res.output
    assert run(FakeExtractor(), clips, out).stored == 3
    assert_same_store(out, reference)
