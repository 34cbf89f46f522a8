"""Text sources: a HF dataset or a local file, each document keeping its absolute row index."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from patchscope.atlas.corpora import BUILTIN, is_builtin

LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".csv")
_SPLIT = re.compile(r"^(?P<name>[\w.-]*)(?:\[(?P<start>\d*):(?P<stop>\d*)\])?$")
DEFAULT_SPLITS = {"NeelNanda/pile-10k": "train[100:250]"}
"""Split used when none is given: the original experiment's slice for its dataset; all rows otherwise."""


class DataError(ValueError):
    """The text source cannot be read as asked; the message says what to change."""


@dataclass(frozen=True)
class SourceConfig:
    """Where the profiled texts come from."""

    dataset: str = field(
        default="NeelNanda/pile-10k",
        metadata={
            "help": "HF dataset id or data folder, a local .txt / .jsonl / .json / .parquet / .csv file, or the built-in "
            "'python-docs' (CPython's pydoc_data prose, one paragraph per document)."
        },
    )
    split: str | None = field(
        default=None,
        metadata={
            "help": "Split and optional row slice, e.g. train[100:250]; for local files and built-ins just [0:300]. Default: all "
            "rows, except train[100:250] (the original experiment's slice) for NeelNanda/pile-10k."
        },
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the text (tables and HF datasets)."})
    streaming: bool = field(default=False, metadata={"help": "Stream the HF dataset instead of downloading it whole."})
    txt_mode: Literal["lines", "file"] = field(
        default="lines", metadata={"help": "For .txt files: one document per line, or the whole file as one document."}
    )

    @property
    def resolved_split(self) -> str:
        """The split read: the given one, else the dataset's default."""
        return self.split if self.split is not None else DEFAULT_SPLITS.get(self.dataset, "")


@dataclass(frozen=True)
class Document:
    index: int
    """Absolute row index in the source (a slice starting at 100 gives 100, 101, ...)."""
    text: str


def parse_split(split: str) -> tuple[str, int, int | None]:
    """``train[100:250]`` -> ``("train", 100, 250)``."""
    match = _SPLIT.match(split.strip())
    if match is None:
        raise DataError(f"cannot read split {split!r}; write it like 'train' or 'train[100:250]'")
    start = int(match["start"]) if match["start"] else 0
    stop = int(match["stop"]) if match["stop"] else None
    if stop is not None and stop <= start:
        raise DataError(f"split {split!r} selects no rows: the slice end must be larger than its start")
    return match["name"] or "train", start, stop


def is_local(dataset: str) -> bool:
    """A single local file we read ourselves; hub ids and data folders go through `datasets.load_dataset`."""
    return Path(dataset).suffix.lower() in LOCAL_SUFFIXES


class TextSource:
    """Iterates the documents of a source; counts the empty ones it skips."""

    def __init__(self, config: SourceConfig) -> None:
        self.config = config
        self.split_name, self.start, self.stop = parse_split(config.resolved_split)
        self.skipped_empty = 0
        self.rows_read: tuple[int, int] | None = None
        """First and last absolute row index of the last full pass (empty rows included)."""
        if is_local(config.dataset):
            path = Path(config.dataset)
            if not path.is_file():
                raise DataError(f"no such file: {config.dataset!r}")
            if path.suffix.lower() not in LOCAL_SUFFIXES:
                raise DataError(f"{path.name}: unsupported file type; use one of {', '.join(LOCAL_SUFFIXES)}")
            size = path.stat().st_size
            if size == 0 or (size < 4096 and not path.read_bytes().strip()):  # only a small file can be blank
                what = "0 bytes" if size == 0 else "only whitespace"
                raise DataError(
                    f"{config.dataset!r} is empty ({what}): it holds no documents; point `dataset` at a file with texts"
                )

    def describe(self) -> str:
        return f"{self.config.dataset} {self.config.resolved_split}".strip()

    def __iter__(self) -> Iterator[Document]:
        self.skipped_empty = 0
        produced = 0
        first = last = None
        for index, text in self._rows():
            first = index if first is None else first
            last = index
            if text is not None and not isinstance(text, str):
                raise DataError(
                    f"{self.describe()}: row {index} of column {self.config.text_column!r} is a {type(text).__name__} "
                    f"({text!r}), not text; point `text_column` at the column that holds the texts"
                )
            if text is None or not text.strip():
                self.skipped_empty += 1
                continue
            produced += 1
            yield Document(index, text)
        self.rows_read = None if first is None or last is None else (first, last)
        if produced == 0:
            raise DataError(
                f"{self.describe()} has no non-empty documents in column {self.config.text_column!r} "
                f"({self.skipped_empty} empty rows skipped); check the split slice and `text_column`"
            )

    def check(self) -> None:
        """Read up to the first document, so a missing column, an unreadable file or an empty selection
        is reported before any model loads."""
        for _ in self:
            return

    def count(self) -> int | None:
        """Rows in the slice (empty ones included) where that is cheap to know: local files; else None."""
        if not is_local(self.config.dataset):
            return None
        total = len(self._local_column())
        return max(0, (total if self.stop is None else min(self.stop, total)) - self.start)

    def fetch(self, indices: Iterable[int]) -> dict[int, str]:
        """The texts of some absolute row indices (one pass over the source)."""
        wanted = set(indices)
        found: dict[int, str] = {}
        for index, text in self._rows():
            if index in wanted:
                found[index] = str(text)
                if len(found) == len(wanted):
                    break
        missing = wanted - found.keys()
        if missing:
            raise DataError(f"rows {sorted(missing)[:5]} are not in {self.describe()}")
        return found

    # -- readers: each yields (absolute row index, text) for the sliced rows

    def _rows(self) -> Iterator[tuple[int, object]]:
        if is_local(self.config.dataset) or is_builtin(self.config.dataset):
            texts = self._local_column()
            stop = len(texts) if self.stop is None else min(self.stop, len(texts))
            for index in range(self.start, stop):
                yield index, texts[index]
        else:
            yield from self._hub_rows()

    def _local_column(self) -> list:
        if is_builtin(self.config.dataset):
            return BUILTIN[self.config.dataset]()
        path = Path(self.config.dataset)
        suffix = path.suffix.lower()
        column = self.config.text_column
        if suffix == ".txt":
            content = _read_utf8(path)
            return [content] if self.config.txt_mode == "file" else split_lines(content)
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            schema = pq.read_schema(path)
            self._check_column(column, schema.names)
            return pq.read_table(path, columns=[column]).column(column).to_pylist()
        if suffix == ".csv":
            import io

            import pandas as pd

            frame = pd.read_csv(io.StringIO(_read_utf8(path)), keep_default_na=False)
            self._check_column(column, list(frame.columns))
            return frame[column].tolist()
        if suffix == ".jsonl":
            records = []
            for number, line in enumerate(split_lines(_read_utf8(path)), start=1):
                if line.strip():
                    records.append(_json_object(path, line, number))
        else:
            try:
                loaded = json.loads(_read_utf8(path))
            except json.JSONDecodeError as error:
                raise DataError(f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}") from error
            listed = (
                loaded
                if isinstance(loaded, list)
                else loaded.get("data", loaded.get("rows", []))
                if isinstance(loaded, dict)
                else None
            )
            if not isinstance(listed, list):
                raise DataError(f'{path}: expected a list of records (or {{"data": [...]}}), got {type(loaded).__name__}')
            if not any(isinstance(record, dict) for record in listed):
                return listed  # a plain list of texts
            for number, record in enumerate(listed):
                if not isinstance(record, dict):
                    raise DataError(
                        f"{path}: record {number} is a JSON {_json_kind(record)}, not an object; "
                        'write one object per record, e.g. {"text": "..."}'
                    )
            records = listed
        if records:
            self._check_column(column, list(records[0]))
        return [record.get(column) for record in records]

    def _check_column(self, column: str, available: list[str]) -> None:
        if column not in available:
            raise DataError(
                f"{self.config.dataset} has no column {column!r}; available: {', '.join(map(str, available))}. Pass `text_column`"
            )

    def _hub_rows(self) -> Iterator[tuple[int, object]]:
        from datasets import load_dataset

        try:
            data = load_dataset(self.config.dataset, split=self.split_name, streaming=self.config.streaming)
        except Exception as error:  # noqa: BLE001 - hub errors come in many types
            raise DataError(
                f"could not load dataset {self.config.dataset!r} split {self.split_name!r}: {error}. "
                "Check the id and split, go online, or pass a local file"
            ) from error
        column = self.config.text_column
        if self.config.streaming:
            if data.column_names is not None:
                self._check_column(column, data.column_names)
            rows = data.skip(self.start)
            if self.stop is not None:
                rows = rows.take(self.stop - self.start)
            for offset, row in enumerate(rows):
                if offset == 0:
                    self._check_column(column, list(row))
                yield self.start + offset, row[column]
            return
        self._check_column(column, data.column_names)
        stop = len(data) if self.stop is None else min(self.stop, len(data))
        if self.start >= stop:
            return
        texts = data.select(range(self.start, stop))[column]
        for offset, text in enumerate(texts):
            yield self.start + offset, text


def count_documents(source: object) -> int | None:
    """How many documents a profile source holds, where that is cheap to know (local files, lists); else None."""
    if isinstance(source, SourceConfig):
        source = TextSource(source)
    if isinstance(source, TextSource):
        return source.count()
    if isinstance(source, Sequence) and not isinstance(source, str):
        return len(source)
    return None


def split_lines(content: str) -> list[str]:
    """Lines as HF's ``load_dataset("text")`` rows: split on ``\n`` only (not form feeds or U+2028).

    ``content`` comes from a file read with universal newlines, so ``\r\n`` and ``\r`` are already ``\n``.
    A final newline ends the last line rather than starting an empty one.
    """
    lines = content.split("\n")
    return lines[:-1] if lines[-1] == "" else lines


def _read_utf8(path: Path) -> str:
    """The file's text; a decoding error names the file, the line and the fix."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataError(
            f"{path}: line {line} is not valid UTF-8 (byte {data[error.start]:#04x} at offset {error.start}); "
            f"convert the file to UTF-8, e.g. `iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}`"
        ) from None
    # the universal-newline translation that open() applies in text mode
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _json_object(path: Path, line: str, number: int) -> dict:
    """One JSON Lines record, which must be an object."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: invalid JSON on line {number} (column {error.colno}): {error.msg}") from error
    if not isinstance(record, dict):
        raise DataError(
            f"{path}: line {number} holds a JSON {_json_kind(record)}, not an object; "
            'write one object per line, e.g. {"text": "..."}'
        )
    return record


def _json_kind(value: object) -> str:
    return {str: "string", int: "number", float: "number", bool: "boolean", list: "array"}.get(type(value), "null")
