"""Documents from strings, .txt / .jsonl files or a Hugging Face data set, read lazily: `iter_texts`."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = ["FILE_SUFFIXES", "TextSource", "iter_texts"]

FILE_SUFFIXES = (".txt", ".jsonl")
TextSource = Iterable[Any] | os.PathLike | Any  # see iter_texts


def iter_texts(source: TextSource, text_column: str = "text") -> Iterator[str]:
    """Yield document strings from `source`, lazily (files are opened when iteration reaches them).

    `source` may be:
      - an iterable or generator of items, each a ``str`` document, a path to a ``.txt`` file (one document per
        file) or a ``.jsonl`` file (one document per line, in field `text_column`), or a mapping with a
        `text_column` field;
      - a single ``Path`` to such a file;
      - a Hugging Face ``datasets.Dataset`` or ``IterableDataset`` (column `text_column`).

    A ``Path`` item is always a file. A ``str`` item is a file when it has no newline, ends in ``.txt`` or
    ``.jsonl`` and names an existing file; such a str without whitespace that names no file raises
    FileNotFoundError (a mistyped path must not become a document). Pass ``Path`` objects to be explicit.
    """
    if isinstance(source, str):
        raise TypeError(
            "iter_texts got a single str, which would be read as one document per character; "
            "pass a list of documents ([text]) or of file paths ([path])."
        )
    if isinstance(source, (bytes, bytearray)):
        raise TypeError("iter_texts got bytes; decode them first (e.g. data.decode('utf-8')) and pass [text].")
    if isinstance(source, os.PathLike):
        path = _checked_file(Path(source))
        return _read_file(path, text_column)
    if _is_from_datasets(source):
        return _iter_dataset(source, text_column)
    if isinstance(source, Mapping) or not isinstance(source, Iterable):
        raise TypeError(
            f"iter_texts cannot read a {type(source).__name__}; expected an iterable of str documents or file "
            f"paths (.txt, .jsonl), a Path, or a datasets.Dataset / IterableDataset."
        )
    return _iter_items(source, text_column)


def _iter_items(items: Iterable[Any], text_column: str) -> Iterator[str]:
    for i, item in enumerate(items):
        if isinstance(item, os.PathLike):
            yield from _read_file(_checked_file(Path(item)), text_column)
        elif isinstance(item, str):
            if _names_file(item):
                yield from _read_file(_checked_file(Path(item)), text_column)
            else:
                yield item
        elif isinstance(item, Mapping):
            yield _as_text(item.get(text_column), f"item {i} (field {text_column!r})")
        else:
            raise TypeError(
                f"iter_texts: item {i} is a {type(item).__name__}; expected a str document, a path (str or Path) "
                f"to a .txt or .jsonl file, or a mapping with a {text_column!r} field."
            )


def _names_file(item: str) -> bool:
    """Whether a str item is a file path rather than a document (see iter_texts)."""
    if "\n" in item or len(item) > 4096 or not item.lower().endswith(FILE_SUFFIXES):
        return False
    if os.path.isfile(item):
        return True
    if not any(ch.isspace() for ch in item):
        raise FileNotFoundError(
            f"iter_texts: {item!r} looks like a file path but no such file exists. Fix the path, or pass "
            f"Path objects for files so that str items are always documents."
        )
    return False


def _checked_file(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"iter_texts: no file at {path}.")
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise TypeError(
            f"iter_texts: cannot read {path}: expected a .txt file (one document) or a .jsonl file "
            f"(one JSON object per line), got {path.suffix or 'no suffix'}."
        )
    return path


def _read_file(path: Path, text_column: str) -> Iterator[str]:
    try:
        if path.suffix.lower() == ".txt":
            yield path.read_text(encoding="utf-8")
            return
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield _jsonl_text(line, text_column, f"{path}:{lineno}")
    except UnicodeDecodeError as err:
        raise ValueError(f"iter_texts: {path} is not UTF-8 text ({err}); re-encode it as UTF-8.") from err


def _jsonl_text(line: str, text_column: str, where: str) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg}); a .jsonl file holds one JSON object per line.") from err
    if not isinstance(row, dict) or text_column not in row:
        keys = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise ValueError(f"{where}: expected an object with field {text_column!r}, got {keys}; set text_column=...")
    return _as_text(row[text_column], f"{where} (field {text_column!r})")


def _as_text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"iter_texts: {where} is a {type(value).__name__}, expected a str document.")
    return value


def _is_from_datasets(source: Any) -> bool:
    """True for a Hugging Face Dataset / IterableDataset; `datasets` is imported only for objects it made."""
    if type(source).__module__.partition(".")[0] != "datasets":
        return False
    import datasets

    if isinstance(source, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        split = next(iter(source), "train")
        raise TypeError(f"iter_texts got a {type(source).__name__}; pick one split, e.g. source[{split!r}].")
    return isinstance(source, (datasets.Dataset, datasets.IterableDataset))


def _iter_dataset(dataset: Any, text_column: str) -> Iterator[str]:
    columns = dataset.column_names  # None for an IterableDataset whose features are unknown
    if columns is not None and text_column not in columns:
        raise ValueError(f"The data set has no column {text_column!r}; its columns are {columns}. Set text_column=...")
    return _dataset_rows(dataset.select_columns([text_column]) if columns else dataset, text_column)


def _dataset_rows(dataset: Any, text_column: str) -> Iterator[str]:
    for i, row in enumerate(dataset):  # a Dataset reads its Arrow table row by row: nothing is materialised
        if text_column not in row:
            raise ValueError(f"Row {i} of the data set has no field {text_column!r}; it has {sorted(row)}.")
        yield _as_text(row[text_column], f"row {i} (column {text_column!r})")
