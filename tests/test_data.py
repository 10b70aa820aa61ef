"""Data loading: built-in sets, the seeded split, and user files with clear errors."""

import numpy as np
import pandas as pd
import pytest

from experts.data import DatasetError, load_dataset, load_file


def test_digits_split_sizes_and_stratification(digits):
    assert (len(digits.train), len(digits.validation), len(digits.test)) == (1077, 360, 360)
    assert digits.input_shape == (64,)
    test_counts = np.bincount(digits.test.y, minlength=10)
    assert test_counts.min() >= 35


def test_split_is_seeded(digits):
    again = load_dataset("digits")

    assert np.array_equal(again.test.x, digits.test.x)


def test_unknown_dataset_lists_choices():
    with pytest.raises(DatasetError, match="expected one of digits, mnist5k"):
        load_dataset("cifar")


def write_csv(tmp_path, frame):
    path = tmp_path / "data.csv"
    frame.to_csv(path, index=False)
    return path


def make_frame(rows=30):
    rng = np.random.default_rng(0)
    return pd.DataFrame({"a": rng.normal(size=rows), "b": rng.normal(size=rows), "label": ["x", "y", "z"] * (rows // 3)})


def test_csv_with_label_column(tmp_path):
    dataset = load_file(write_csv(tmp_path, make_frame()), "label")

    assert dataset.class_names == ("x", "y", "z")
    assert dataset.input_shape == (2,)


def test_parquet_loads_like_csv(tmp_path):
    path = tmp_path / "data.parquet"
    make_frame().to_parquet(path)

    assert load_file(path, "label").num_classes == 3


def test_missing_label_column_named(tmp_path):
    with pytest.raises(DatasetError, match="label column 'target' not found") as caught:
        load_file(write_csv(tmp_path, make_frame()), "target")

    assert caught.value.field == "label_column"


def test_non_numeric_feature_named(tmp_path):
    frame = make_frame()
    frame["colour"] = "red"

    with pytest.raises(DatasetError, match="feature column 'colour' is not numeric"):
        load_file(write_csv(tmp_path, frame), "label")


def test_nan_feature_names_column_and_row(tmp_path):
    frame = make_frame()
    frame.loc[4, "b"] = np.nan

    with pytest.raises(DatasetError, match="feature column 'b' has a NaN or infinite value in row 4"):
        load_file(write_csv(tmp_path, frame), "label")


def test_npz_missing_array_named(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, x=np.zeros((9, 2)))

    with pytest.raises(DatasetError, match="array 'y' is missing"):
        load_file(path)


def test_npz_round_trip(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, x=np.arange(60, dtype=np.float32).reshape(30, 2), y=np.arange(30) % 3)

    assert len(load_file(path).test) == 6


def test_csv_needs_label_column(tmp_path):
    with pytest.raises(DatasetError, match="needs --label-column"):
        load_file(write_csv(tmp_path, make_frame()))


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(DatasetError, match="is a directory"):
        load_file(tmp_path)


def test_header_only_csv_has_no_rows(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("a,b,label\n")

    with pytest.raises(DatasetError, match="no data rows"):
        load_file(path, "label")
