import json

import pandas as pd
import pytest

from patchscope.atlas.sources import DataError, SourceConfig, TextSource, parse_split

ROWS = ["alpha text", "", "gamma text", "delta text", "   ", "zeta text"]


def _write_all(tmp_path):
    frame = pd.DataFrame({"body": ROWS, "other": range(len(ROWS))})
    paths = {
        "csv": tmp_path / "d.csv",
        "parquet": tmp_path / "d.parquet",
        "jsonl": tmp_path / "d.jsonl",
        "json": tmp_path / "d.json",
    }
    frame.to_csv(paths["csv"], index=False)
    frame.to_parquet(paths["parquet"])
    paths["jsonl"].write_text("\n".join(json.dumps({"body": r}) for r in ROWS))
    paths["json"].write_text(json.dumps([{"body": r} for r in ROWS]))
    return paths


@pytest.mark.parametrize("kind", ["csv", "parquet", "jsonl", "json"])
def test_tables_keep_absolute_rows_and_skip_empty(tmp_path, kind):
    path = _write_all(tmp_path)[kind]
    source = TextSource(SourceConfig(dataset=str(path), split="[1:6]", text_column="body"))
    docs = list(source)
    assert [(d.index, d.text) for d in docs] == [(2, "gamma text"), (3, "delta text"), (5, "zeta text")]
    assert source.skipped_empty == 2
    assert source.fetch([5, 2]) == {5: "zeta text", 2: "gamma text"}


def test_txt_lines_and_whole_file(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("one\n\ntwo\nthree\n")
    assert [(d.index, d.text) for d in TextSource(SourceConfig(dataset=str(path), split=""))] == [(0, "one"), (2, "two"), (3, "three")]
    whole = list(TextSource(SourceConfig(dataset=str(path), split="", txt_mode="file")))
    assert len(whole) == 1 and whole[0].text.startswith("one")


def test_hf_loader_on_a_local_data_folder(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(json.dumps({"text": f"row {i}" if i != 3 else ""}) for i in range(10)))
    for streaming in (False, True):
        source = TextSource(SourceConfig(dataset=str(folder), split="train[2:6]", streaming=streaming))
        assert [(d.index, d.text) for d in source] == [(2, "row 2"), (4, "row 4"), (5, "row 5")]


def test_unknown_column_and_empty(tmp_path):
    path = _write_all(tmp_path)["csv"]
    with pytest.raises(DataError, match="no column 'text'.*body"):
        list(TextSource(SourceConfig(dataset=str(path), split="")))
    with pytest.raises(DataError, match="no non-empty documents"):
        list(TextSource(SourceConfig(dataset=str(path), split="[1:2]", text_column="body")))
    with pytest.raises(DataError, match="no such file"):
        TextSource(SourceConfig(dataset=str(tmp_path / "missing.csv"), split=""))


def test_parse_split():
    assert parse_split("train[100:250]") == ("train", 100, 250)
    assert parse_split("validation") == ("validation", 0, None)
    with pytest.raises(DataError):
        parse_split("train[5:2]")
