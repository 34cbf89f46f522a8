import json

import pandas as pd
import pytest
from run_inputs import TEXTS, write_corpus

from patchscope.atlas.sources import DataError, SourceConfig, TextSource, parse_split
from patchscope.cli.main import main

LAYER = 2
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
    assert [(d.index, d.text) for d in TextSource(SourceConfig(dataset=str(path), split=""))] == [
        (0, "one"),
        (2, "two"),
        (3, "three"),
    ]
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


@pytest.mark.parametrize("content", [b"", b"\n \n"])
def test_an_empty_file_is_called_empty(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=r"empty.jsonl' is empty \((0 bytes|only whitespace)\): it holds no documents"):
        TextSource(SourceConfig(dataset=str(path), split=""))


def test_parse_split():
    assert parse_split("train[100:250]") == ("train", 100, 250)
    assert parse_split("validation") == ("validation", 0, None)
    with pytest.raises(DataError):
        parse_split("train[5:2]")


def test_txt_lines_match_hf_text_loader(tmp_path):
    """Form feeds, U+2028 and other str.splitlines() breaks stay inside a line, as in HF's loader."""
    from datasets import load_dataset

    path = tmp_path / "d.txt"
    path.write_bytes("one\x0cstill one\nu2028\u2028inside\r\nthree\x1dgs\rfour\n\nsix\x85x\n".encode())
    hf_rows = load_dataset("text", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache"))["text"]
    ours = {d.index: d.text for d in TextSource(SourceConfig(dataset=str(path), split=""))}
    assert ours == {i: text for i, text in enumerate(hf_rows) if text.strip()}
    assert len(hf_rows) == 6 and ours[0] == "one\x0cstill one"


def test_jsonl_errors_name_the_file_and_the_real_line(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": f"row {i}"}) for i in range(40)]
    lines[5] = ""
    lines[30] = '{"text": "broken'
    path.write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"d\.jsonl: invalid JSON on line 31"):
        list(TextSource(SourceConfig(dataset=str(path), split="")))
    lines[30] = json.dumps("a bare string")
    path.write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"d\.jsonl: line 31 holds a JSON string, not an object"):
        list(TextSource(SourceConfig(dataset=str(path), split="")))
    whole = tmp_path / "d.json"
    whole.write_text("[\n" + ",\n".join(['{"text": "a"}'] * 9 + ['{"text": }']) + "\n]")
    with pytest.raises(DataError, match=r"d\.json: invalid JSON at line 11"):
        list(TextSource(SourceConfig(dataset=str(whole), split="")))
    whole.write_text(json.dumps([{"text": "a"}, 7]))
    with pytest.raises(DataError, match="record 1 is a JSON number, not an object"):
        list(TextSource(SourceConfig(dataset=str(whole), split="")))


@pytest.mark.parametrize("kind", ["csv", "jsonl", "json"])
def test_numbers_are_not_text_and_not_empty(tmp_path, kind):
    path = tmp_path / f"d.{kind}"
    if kind == "csv":
        pd.DataFrame({"text": [1, 2, 3]}).to_csv(path, index=False)
    elif kind == "jsonl":
        path.write_text("\n".join(json.dumps({"text": v}) for v in ("a", 3.5)))
    else:
        path.write_text(json.dumps([{"text": 12}]))
    with pytest.raises(DataError, match=r"is a (int|float) \(.*\), not text") as error:
        list(TextSource(SourceConfig(dataset=str(path), split="")))
    assert "empty" not in str(error.value)


@pytest.mark.parametrize("kind", ["txt", "jsonl", "csv"])
def test_non_utf8_names_the_file_line_and_fix(tmp_path, kind):
    path = tmp_path / f"d.{kind}"
    rows = {
        "txt": ["one", "two", "caf\xe9"],
        "jsonl": ['{"text": "a"}', '{"text": "caf\xe9"}'],
        "csv": ["text", "a", "b", "caf\xe9"],
    }[kind]
    path.write_bytes("\n".join(rows).encode("latin-1"))
    with pytest.raises(DataError, match=rf"d\.{kind}: line {len(rows)} is not valid UTF-8.*iconv -f latin1 -t utf-8"):
        list(TextSource(SourceConfig(dataset=str(path), split="")))


@pytest.mark.parametrize(
    "dataset, split, column, message",
    [
        ("missing.jsonl", "", "text", "no such file"),
        ("corpus.jsonl", "train[5:2]", "text", "selects no rows"),
        ("corpus.jsonl", "[500:900]", "text", "no non-empty documents"),
        ("corpus.jsonl", "", "body", "no column 'body'"),
    ],
)
def test_run_checks_the_data_before_loading_the_model(gemma_dir, tmp_path, monkeypatch, capsys, dataset, split, column, message):
    write_corpus(tmp_path / "corpus.jsonl", TEXTS)
    monkeypatch.setattr("patchscope.experiment.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr("patchscope.model.loading.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out"
    common = [
        "--model",
        str(gemma_dir),
        "--device",
        "cpu",
        "--dataset",
        str(tmp_path / dataset),
        "--split",
        split,
        "--text-column",
        column,
        "--layer",
        str(LAYER),
        "--out",
        str(out),
    ]
    assert main(["run", "--sae", "none", *common]) == 2
    assert message in capsys.readouterr().err and not out.exists()
    assert main(["profile", *common]) == 2
    assert message in capsys.readouterr().err and not out.exists()
