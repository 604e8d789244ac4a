"""The one freshness rule (vcb_lib.manifest): current, missing, stale (naming the keys that
changed), corrupt (a file gone, truncated or altered), building; a stage refuses what is not current."""
import pytest

from vcb_lib.manifest import Artefact, ArtefactError, changed_keys, remove


def test_file_artefact_states(tmp_path):
    path = tmp_path / "stage" / "table.parquet"
    art = Artefact(path, "02_generate", {"sampling.n": 4, "sampling.temperature": 1.0})
    assert art.status()[0] == "missing"
    with pytest.raises(ArtefactError, match=r"table.parquet is not built yet.*--from 02"):
        art.require()
    path.parent.mkdir()
    path.write_bytes(b"x" * 100)
    art.begin()
    assert art.status()[0] == "building" and art.resumable()
    art.seal()
    assert art.current() and art.require() == path
    # another config: stale, naming the key and both values
    other = Artefact(path, "02_generate", {"sampling.n": 4, "sampling.temperature": 0.5})
    state, detail = other.status()
    assert state == "stale" and "sampling.temperature: 1.0 -> 0.5" in detail and not other.resumable()
    with pytest.raises(ArtefactError, match="is stale.*sampling.temperature: 1.0 -> 0.5.*run stage 02_generate"):
        other.require()
    # truncated, then altered with the same size, then deleted: corrupt each time
    path.write_bytes(b"x" * 50)
    assert art.status() == ("corrupt", f"{path} has 50 bytes, its manifest says 100")
    path.write_bytes(b"y" * 100)
    assert art.status() == ("corrupt", f"{path} does not match its checksum")
    path.unlink()
    assert art.status() == ("corrupt", f"{path} is missing")
    with pytest.raises(ArtefactError, match="is corrupt"):
        art.require()
    art.manifest_path.write_text("{not json")
    assert art.status()[0] == "corrupt"


def test_folder_artefact_checks_only_its_content_files(tmp_path):
    folder = tmp_path / "03_train" / "vcb"
    (folder / "final").mkdir(parents=True)
    (folder / "checkpoints").mkdir()
    (folder / "final" / "model.safetensors").write_bytes(b"weights")
    (folder / "summary.json").write_text("{}")
    (folder / "checkpoints" / "optimizer.bin").write_bytes(b"state")
    art = Artefact(folder, "03_train", {"training.gamma": 0.05}, include=("final/*", "summary.json"))
    art.seal()
    assert art.current()
    (folder / "checkpoints" / "optimizer.bin").write_bytes(b"")  # work state is not content
    assert art.current()
    (folder / "final" / "model.safetensors").unlink()
    assert art.status() == ("corrupt", f"{folder / 'final' / 'model.safetensors'} is missing")
    remove(folder)
    assert not folder.exists() and not art.manifest_path.exists()


def test_changed_keys_lists_added_removed_and_changed():
    assert changed_keys({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 4}) == ["b: 2 -> 3", 'c: "<unset>" -> 4']
