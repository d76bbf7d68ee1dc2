"""Calibration text from a Hugging Face ``datasets`` dataset, the way users hold their data:
a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, or a dataset
name (or a local folder of data files) that ``datasets.load_dataset`` resolves.

Nothing is downloaded: ``load_dataset`` runs with ``HF_DATASETS_OFFLINE`` set, so a name
loads only from the local cache, and a name that is not there is one clear error saying
how to get it there. ``datasets`` is the optional ``[datasets]`` extra; the core install
reads ``.txt`` / ``.jsonl`` / ``.npz`` without it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from outlierquant.errors import InputError, require_extra

#: files ``save_to_disk`` writes: a Dataset folder has ``dataset_info.json`` + ``state.json``,
#: a DatasetDict folder ``dataset_dict.json`` and one Dataset folder per split
SAVED_DATASET_FILES = ("dataset_dict.json", "state.json")


@dataclass(frozen=True)
class DatasetSource:
    """Where calibration text comes from when it is a ``datasets`` dataset.

    ``name``: a ``save_to_disk`` folder, a local folder of data files, or a dataset name
    in the local Hugging Face cache. ``split`` picks one split of a DatasetDict (or of a
    named dataset); ``text_column`` is the column holding the text.
    """

    name: str
    split: str = "train"
    text_column: str = "text"
    config: str | None = None

    def __str__(self) -> str:
        config = f", config {self.config}" if self.config else ""
        return f"dataset {self.name} (split {self.split}{config}, column {self.text_column!r})"


def is_saved_dataset(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by ``save_to_disk``."""
    path = Path(path)
    return path.is_dir() and any((path / name).is_file() for name in SAVED_DATASET_FILES)


def _import_datasets():
    require_extra("reading a Hugging Face dataset", "datasets")
    # Set before the import: datasets reads it into its config when first imported; set on
    # the config too in case it was imported earlier (by the caller, or by the API's user).
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    if os.environ.get("HF_DATASETS_OFFLINE", "1") not in ("0", "false", "False"):
        datasets.config.HF_DATASETS_OFFLINE = True
    return datasets


def _load(source: DatasetSource):
    datasets = _import_datasets()
    path = Path(source.name)
    if is_saved_dataset(path):
        try:
            return datasets.load_from_disk(str(path))
        except Exception as exc:  # noqa: BLE001 - datasets raises many kinds; one line for the user
            raise InputError(f"{path}: not a readable save_to_disk dataset ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if path.is_file():
        raise InputError(f"{path}: --dataset takes a dataset name or folder; give a data file "
                         "with --calibration-data")
    try:
        return datasets.load_dataset(source.name, source.config, split=source.split)
    except ValueError as exc:
        # an unknown split of a dataset that is there
        if "split" in str(exc).lower():
            raise InputError(f"{source}: {str(exc).splitlines()[0]}") from exc
        raise _not_cached(source, exc) from exc
    except Exception as exc:  # noqa: BLE001 - offline misses surface as ConnectionError, FileNotFoundError, ...
        raise _not_cached(source, exc) from exc


def _not_cached(source: DatasetSource, exc: BaseException) -> InputError:
    where = "folder" if Path(source.name).is_dir() else "name"
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return InputError(
        f"{source}: could not be loaded offline by {where} ({detail[:160]}); outlierquant does not "
        "download data: load it once with datasets.load_dataset on a machine online (it is then in "
        "the local cache), or save it with save_to_disk and pass that folder")


def dataset_texts(source: DatasetSource, *, limit: int | None = None) -> list[str]:
    """The non-blank texts of ``source``'s text column, stripped (at most ``limit``)."""
    data = _load(source)
    if isinstance(getattr(data, "column_names", None), dict):  # a DatasetDict: one split
        splits = list(data.keys())
        if source.split not in splits:
            raise InputError(f"{source}: no split {source.split!r} (splits: {', '.join(splits)}); "
                             "choose one with --dataset-split")
        data = data[source.split]
    columns = list(data.column_names)
    if source.text_column not in columns:
        raise InputError(f"{source}: no column {source.text_column!r} (columns: {', '.join(columns)}); "
                         "choose one with --text-column")
    texts: list[str] = []
    for number, value in enumerate(data[source.text_column], 1):
        if not isinstance(value, str):
            raise InputError(f"{source}: row {number}: {source.text_column!r} is {type(value).__name__}, not text")
        value = value.strip()
        if value:
            texts.append(value)
            if limit is not None and len(texts) >= limit:
                break
    if not texts:
        raise InputError(f"{source}: no non-blank text in column {source.text_column!r}")
    return texts
