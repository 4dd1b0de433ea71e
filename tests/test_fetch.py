import pytest

from realm_lm.corpus.fetch import DATA_FILES, FetchError, fetch_data


def test_wrong_checksum_is_a_clear_error(tmp_path, monkeypatch):
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / DATA_FILES[0].name).write_text("{}")
    with pytest.raises(FetchError, match="checksum mismatch"):
        fetch_data(dest)


def test_local_copy_with_wrong_checksum_is_not_placed(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    for spec in DATA_FILES:
        (shared / spec.name).write_text("tampered")
    monkeypatch.setenv("REALM_SHARED_DATA", str(shared))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FetchError, match="checksum mismatch"):
        fetch_data(tmp_path / "data")
    assert not list((tmp_path / "data").iterdir())


def test_local_copy_is_checked_and_placed(tmp_path, monkeypatch):
    from pathlib import Path
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not shared.is_dir():
        pytest.skip("../shared/data is not beside the project")
    monkeypatch.setenv("REALM_SHARED_DATA", str(shared))
    placed = fetch_data(tmp_path / "data")
    assert [p.name for p in placed] == [spec.name for spec in DATA_FILES]
    assert not list((tmp_path / "data").glob(".*part"))
