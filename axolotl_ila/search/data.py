"""Is there data for the search to train on? Checked before the search model is built.

Without these checks an empty dataset file fails deep inside ``datasets`` (a bare
``StopIteration``), and data whose every row axolotl drops (longer than
``sequence_len``) fails in the sampler once the search model has loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from axolotl_ila.search.settings import SearchError

# A file this small is read whole to see whether it holds anything but blanks.
_SMALL_FILE_BYTES = 4096


def _field(dataset: Any, key: str) -> Any:
    return dataset.get(key) if isinstance(dataset, dict) else getattr(dataset, key, None)


def _local_files(dataset: Any) -> list[Path]:
    """The local files a dataset entry reads (``path``, ``data_files``), if any."""
    files = _field(dataset, "data_files") or []
    candidates = [files] if isinstance(files, str) else list(files)
    candidates.append(_field(dataset, "path"))
    return [Path(f) for f in candidates if isinstance(f, str) and Path(f).is_file()]


def _is_blank(path: Path) -> bool:
    size = path.stat().st_size
    return size == 0 or (size <= _SMALL_FILE_BYTES and not path.read_bytes().strip())


def describe_datasets(cfg: Any) -> str:
    return ", ".join(f"{_field(d, 'path')} (type {_field(d, 'type')})" for d in cfg.datasets or []) or "none"


def check_dataset_files(cfg: Any) -> None:
    """Before axolotl loads the data: no dataset file of the config is empty."""
    for dataset in cfg.datasets or []:
        for path in _local_files(dataset):
            if _is_blank(path):
                raise SearchError(
                    f"dataset file {path} is empty, so the ILA search has nothing to train on; "
                    f"fill it, or remove it from `datasets`."
                )


def check_search_data(cfg: Any, dataset_meta: Any) -> None:
    """After axolotl has loaded and filtered the data: at least one training row is left."""
    train = getattr(dataset_meta, "train_dataset", None)
    if train is not None and len(train) > 0:
        return
    raise SearchError(
        f"the ILA search has no training rows: after axolotl's preprocessing nothing is left of "
        f"datasets {describe_datasets(cfg)}. Likely causes: every row is longer than sequence_len "
        f"({cfg.sequence_len}) and was dropped (raise sequence_len, or set excess_length_strategy: "
        f"truncate); rows shorter than min_sample_len; or rows that lack the fields their `type` "
        f"reads. Check the data, then run again."
    )
