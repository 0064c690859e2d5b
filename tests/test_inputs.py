import itertools
import re
from pathlib import Path

import numpy as np
import pytest

from qpipe.inputs import (
    CsvDecoder,
    DecodeError,
    FixedLengthRecordDecoder,
    NpyDecoder,
    filename_epochs,
    list_files,
    shard_files,
)

DIGITS = Path(__file__).resolve().parents[1] / "topologies" / "data" / "digits"


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def assert_items_equal(actual, expected):
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        assert len(got) == len(want)
        for got_array, want_array in zip(got, want, strict=True):
            assert got_array.dtype == want_array.dtype
            np.testing.assert_array_equal(got_array, want_array)


def stack(records):
    return tuple(np.stack(parts) for parts in zip(*records, strict=True))


# --------------------------------------------------------------------------- CSV


def test_csv_rows_become_a_feature_vector_and_a_scalar_label(tmp_path):
    path = write(tmp_path / "d.csv", "p0,p1,p2,label\n1,2,3,7\n4,5,6,8\n")
    decoder = CsvDecoder(
        {"p0": "float32", "p1": "float32", "p2": "float32", "label": "int64"},
        components=[slice("p0", "p2"), "label"],
    )
    assert decoder.dtypes == (np.dtype("float32"), np.dtype("int64"))
    assert decoder.shapes == ((3,), ())
    records = list(decoder.read_records(path))
    assert_items_equal(
        records,
        [
            (np.array([1, 2, 3], np.float32), np.array(7, np.int64)),
            (np.array([4, 5, 6], np.float32), np.array(8, np.int64)),
        ],
    )


def test_csv_without_components_gives_one_scalar_per_column(tmp_path):
    path = write(tmp_path / "d.csv", "a,b\n1,x\n")
    (record,) = CsvDecoder({"a": "int32", "b": "string"}).read_records(path)
    assert record[0].shape == () and record[0] == 1 and record[0].dtype == np.int32
    assert record[1] == "x"


def test_csv_a_list_of_names_selects_a_vector_in_that_order(tmp_path):
    path = write(tmp_path / "d.csv", "a,b,c\n1,2,3\n")
    decoder = CsvDecoder({"a": "int64", "b": "int64", "c": "int64"}, components=[["c", "a"]])
    (record,) = decoder.read_records(path)
    np.testing.assert_array_equal(record[0], [3, 1])


def test_csv_malformed_field_error_names_file_line_and_column(tmp_path):
    path = write(tmp_path / "train-0.csv", "a,b\n1,2\n3,abc\n")
    decoder = CsvDecoder({"a": "int64", "b": "int64"})
    with pytest.raises(DecodeError) as caught:
        list(decoder.read_records(path))
    assert str(caught.value) == f"{path}:3: column 'b': could not parse 'abc' as int64"
    assert (caught.value.path, caught.value.line, caught.value.column) == (str(path), 3, "b")


def test_csv_error_names_the_line_where_a_multiline_row_starts(tmp_path):
    path = write(tmp_path / "d.csv", 'text,n\n"two\nlines",1\nok,x\n')
    with pytest.raises(DecodeError, match=r"d\.csv:4: column 'n': could not parse 'x' as int64"):
        list(CsvDecoder({"text": "string", "n": "int64"}).read_records(path))


def test_csv_error_names_the_first_bad_column_of_the_row_in_file_order(tmp_path):
    path = write(tmp_path / "d.csv", "a,b,c\n1,x,y\n")
    decoder = CsvDecoder({"c": "int64", "a": "int64", "b": "int64"}, components=[["c", "b"], "a"])
    with pytest.raises(DecodeError, match="column 'b'"):
        decoder.read_all(path)


def test_csv_records_before_a_bad_row_are_yielded_before_the_error(tmp_path):
    path = write(tmp_path / "d.csv", "a\n1\n2\nbad\n4\n")
    records = CsvDecoder({"a": "int64"}).read_records(path)
    assert [int(record[0]) for record in itertools.islice(records, 2)] == [1, 2]
    with pytest.raises(DecodeError, match=":4: column 'a'"):
        next(records)


def test_csv_skip_mode_skips_and_counts_bad_rows_and_keeps_the_first_messages(tmp_path):
    path = write(tmp_path / "d.csv", "a,b\n1,2\nx,2\n3,4\n5,y\n6,7,8\n9,10\n")
    decoder = CsvDecoder({"a": "int64", "b": "int64"}, on_error="skip", max_messages=2)
    (a, b) = decoder.read_all(path)
    np.testing.assert_array_equal(a, [1, 3, 9])
    np.testing.assert_array_equal(b, [2, 4, 10])
    assert decoder.skipped == 3
    assert decoder.skip_messages == (
        f"{path}:3: column 'a': could not parse 'x' as int64",
        f"{path}:5: column 'b': could not parse 'y' as int64",
    )
    decoder.read_all(path)
    assert decoder.skipped == 6
    assert len(decoder.skip_messages) == 2


def test_csv_defaults_fill_empty_and_missing_fields(tmp_path):
    path = write(tmp_path / "d.csv", "a,b,c\n1,,x\n2, ,\n3\n")
    decoder = CsvDecoder(
        {"a": "int64", "b": "float32", "c": "string"}, defaults={"b": -1.5, "c": "none"}
    )
    a, b, c = decoder.read_all(path)
    np.testing.assert_array_equal(a, [1, 2, 3])
    np.testing.assert_array_equal(b, np.array([-1.5, -1.5, -1.5], np.float32))
    assert c.tolist() == ["x", "none", "none"]


def test_csv_empty_field_without_default_is_an_error(tmp_path):
    path = write(tmp_path / "d.csv", "a,b\n1,\n")
    with pytest.raises(DecodeError, match=r":2: column 'b': the field is empty and the column has no default"):
        CsvDecoder({"a": "int64", "b": "int64"}).read_all(path)


@pytest.mark.parametrize(
    ("dtype", "field", "message"),
    [
        ("uint8", "256", "256 is out of range for uint8 (0 to 255)"),
        ("int8", "-129", "-129 is out of range for int8 (-128 to 127)"),
        ("int64", "9223372036854775808", "9223372036854775808 is out of range for int64"),
        ("uint64", "-1", "-1 is out of range for uint64"),
        ("int64", "1.5", "could not parse '1.5' as int64"),
        ("float32", "1e40", "1e40 is out of range for float32"),
        ("bool", "yes", "could not parse 'yes' as bool"),
    ],
)
def test_csv_values_are_never_wrapped_rounded_or_truncated(tmp_path, dtype, field, message):
    path = write(tmp_path / "d.csv", f"v\n{field}\n")
    with pytest.raises(DecodeError, match=":2: column 'v': " + re.escape(message)):
        CsvDecoder({"v": dtype}).read_all(path)


def test_csv_parses_bools_case_insensitively_and_extreme_integers(tmp_path):
    path = write(tmp_path / "d.csv", "f,u,i\nTrue,18446744073709551615,-9223372036854775808\n0, 0 ,+5\n")
    f, u, i = CsvDecoder({"f": "bool", "u": "uint64", "i": "int64"}).read_all(path)
    assert f.tolist() == [True, False]
    assert u.tolist() == [2**64 - 1, 0]
    assert i.tolist() == [-(2**63), 5]


def test_csv_row_with_too_many_fields_is_an_error(tmp_path):
    path = write(tmp_path / "d.csv", "a,b\n1,2,3\n")
    with pytest.raises(DecodeError, match=r":2: found 3 fields, expected 2 as in the header$"):
        CsvDecoder({"a": "int64", "b": "int64"}).read_all(path)


def test_csv_header_columns_are_found_by_name_and_extra_ones_ignored(tmp_path):
    path = write(tmp_path / "d.csv", "id, label ,x\nq,1,2.5\n")
    label, x = CsvDecoder({"label": "int64", "x": "float64"}).read_all(path)
    assert label.tolist() == [1] and x.tolist() == [2.5]


def test_csv_header_lacking_a_declared_column_is_an_error(tmp_path):
    path = write(tmp_path / "d.csv", "a,b\n1,2\n")
    with pytest.raises(DecodeError, match=r":1: the header lacks declared column 'c' \(and 1 more\); its 2 columns are 'a', 'b'"):
        CsvDecoder({"a": "int64", "c": "int64", "d": "int64"}).read_all(path)


def test_csv_header_naming_a_declared_column_twice_is_an_error(tmp_path):
    path = write(tmp_path / "d.csv", "a,b,a\n1,2,3\n")
    with pytest.raises(DecodeError, match=r"names column 'a' twice \(fields 1 and 3\)"):
        CsvDecoder({"a": "int64"}).read_all(path)


def test_csv_without_header_reads_columns_by_position(tmp_path):
    path = write(tmp_path / "d.csv", "1;2\n3;4\n")
    a, b = CsvDecoder({"a": "int16", "b": "int16"}, header=False, delimiter=";").read_all(path)
    assert a.tolist() == [1, 3] and b.tolist() == [2, 4]


def test_csv_empty_file_is_an_error_when_a_header_is_expected(tmp_path):
    path = write(tmp_path / "d.csv", "")
    with pytest.raises(DecodeError, match="the file is empty, but a header line was expected"):
        CsvDecoder({"a": "int64"}).read_all(path)


def test_csv_header_only_file_gives_no_records_and_empty_batches(tmp_path):
    path = write(tmp_path / "d.csv", "a,b,c\n\n")
    decoder = CsvDecoder({"a": "int64", "b": "int64", "c": "int64"}, components=[["a", "b"], "c"])
    assert list(decoder.read_records(path)) == []
    assert list(decoder.read_batches(path, 4)) == []
    features, labels = decoder.read_all(path)
    assert features.shape == (0, 2) and labels.shape == (0,)


def test_csv_invalid_utf8_error_names_the_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"a\n1\n" * 5000 + b"\xff\n")
    with pytest.raises(DecodeError, match=r"d\.csv:10001: byte 1 of the line is not valid UTF-8"):
        CsvDecoder({"a": "int64"}).read_all(path)


def test_csv_utf8_byte_order_mark_is_ignored(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"\xef\xbb\xbfa\n1\n")
    assert CsvDecoder({"a": "int64"}).read_all(path)[0].tolist() == [1]


def test_csv_bad_quoting_error_names_the_line(tmp_path):
    path = write(tmp_path / "d.csv", 'a,b\n1,2\n"x"y,3\n')
    with pytest.raises(DecodeError, match=r":3: malformed CSV"):
        CsvDecoder({"a": "string", "b": "int64"}).read_all(path)


@pytest.mark.parametrize("batch_size", [1, 3, 7, 100, 2000])
def test_csv_batches_hold_the_same_items_as_records(tmp_path, batch_size):
    rng = np.random.default_rng(0)
    values = rng.integers(0, 17, size=(1500, 4))
    lines = ["a,b,c,y"] + [",".join(map(str, row)) for row in values]
    path = write(tmp_path / "d.csv", "\n".join(lines) + "\n")
    decoder = CsvDecoder(
        {"a": "float32", "b": "float32", "c": "float32", "y": "int64"}, components=[slice("a", "c"), "y"]
    )
    batches = list(decoder.read_batches(path, batch_size))
    assert all(len(batch[0]) == batch_size for batch in batches[:-1])
    assert all(array.flags.c_contiguous for batch in batches for array in batch)
    merged = tuple(np.concatenate(parts) for parts in zip(*batches, strict=True))
    assert_items_equal([merged], [stack(decoder.read_records(path))])
    np.testing.assert_array_equal(merged[0], values[:, :3].astype(np.float32))


def test_csv_batches_in_skip_mode_are_full_despite_skipped_rows(tmp_path):
    lines = ["a"] + [("bad" if n % 3 == 0 else str(n)) for n in range(20)]
    path = write(tmp_path / "d.csv", "\n".join(lines) + "\n")
    decoder = CsvDecoder({"a": "int64"}, on_error="skip")
    batches = [batch[0].tolist() for batch in decoder.read_batches(path, 4)]
    assert batches == [[1, 2, 4, 5], [7, 8, 10, 11], [13, 14, 16, 17], [19]]
    assert decoder.skipped == 7


def test_csv_batches_before_a_bad_row_are_yielded_before_the_error(tmp_path):
    path = write(tmp_path / "d.csv", "a\n1\n2\n3\nbad\n")
    batches = CsvDecoder({"a": "int64"}).read_batches(path, 2)
    assert next(batches)[0].tolist() == [1, 2]
    with pytest.raises(DecodeError, match=":5: column 'a'"):
        next(batches)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"columns": {}}, ValueError, "at least one column"),
        ({"columns": [("a", "int64"), ("a", "float32")]}, ValueError, "column 'a' is declared 2 times"),
        ({"columns": {"a": "int65"}}, ValueError, "column 'a': 'int65' is not a dtype"),
        ({"columns": {"a": "complex64"}}, ValueError, "column 'a': dtype complex64 is not supported"),
        ({"columns": {"a": "int64"}, "defaults": {"b": 0}}, ValueError, "defaults name 'b'"),
        ({"columns": {"a": "int64"}, "defaults": {"a": 1.5}}, ValueError, "the default 1.5 is not a valid int64"),
        ({"columns": {"a": "uint8"}, "defaults": {"a": -1}}, ValueError, "-1 is out of range for uint8"),
        ({"columns": {"a": "int64"}, "on_error": "ignore"}, ValueError, "on_error must be 'raise' or 'skip'"),
        ({"columns": {"a": "int64"}, "components": ["b"]}, ValueError, "component 0: 'b' is not a declared column"),
        (
            {"columns": {"a": "int64", "b": "float32"}, "components": [["a", "b"]]},
            ValueError,
            "component 0 mixes dtypes: 'b' is float32 but 'a' is int64",
        ),
        (
            {"columns": {"a": "int64", "b": "int64"}, "components": [slice("b", "a")]},
            ValueError,
            "'b' is declared after 'a'",
        ),
        ({"columns": {"a": "int64"}, "components": [slice(0, 1)]}, TypeError, "two column names"),
        ({"columns": {"a": "int64"}, "components": [3]}, TypeError, "component 0: expected a column name"),
        ({"columns": {"a": "int64"}, "delimiter": ", "}, ValueError, "delimiter must be one character"),
    ],
)
def test_csv_decoder_rejects_a_bad_configuration_with_a_precise_message(kwargs, error, message):
    with pytest.raises(error, match=message):
        CsvDecoder(**kwargs)


def test_csv_column_in_no_component_is_checked_but_not_returned(tmp_path):
    path = write(tmp_path / "d.csv", "a,b\n1,2\n3,x\n")
    decoder = CsvDecoder({"a": "int64", "b": "int64"}, components=["a"])
    assert decoder.dtypes == (np.dtype("int64"),)
    with pytest.raises(DecodeError, match=":3: column 'b'"):
        decoder.read_all(path)


def test_the_digits_csv_shards_parse_into_pixels_and_labels():
    columns = {f"pixel{i}": "uint8" for i in range(64)} | {"label": "int64"}
    decoder = CsvDecoder(columns, components=[slice("pixel0", "pixel63"), "label"])
    expected_rows = {
        "train-0.csv": 270,
        "train-1.csv": 269,
        "train-2.csv": 269,
        "train-3.csv": 269,
        "validation.csv": 360,
        "test.csv": 360,
    }
    all_pixels = []
    for name, rows in expected_rows.items():
        pixels, labels = decoder.read_all(DIGITS / name)
        assert pixels.shape == (rows, 64), name
        assert pixels.max() <= 16, name
        assert sorted(set(labels.tolist())) == list(range(10)), name
        all_pixels.append(pixels)
    assert sum(len(pixels) for pixels in all_pixels) == 1797
    first_record = next(decoder.read_records(DIGITS / "train-0.csv"))
    np.testing.assert_array_equal(first_record[0], all_pixels[0][0])


# --------------------------------------------------------------------------- fixed-length


def test_fixed_length_records_decode_each_component_at_its_offset(tmp_path):
    labels = np.array([3, 9], np.uint8)
    images = np.arange(2 * 2 * 3, dtype=">u2").reshape(2, 2, 3)
    body = b"".join(bytes([label]) + b"\x00" + image.tobytes() for label, image in zip(labels, images, strict=True))
    path = tmp_path / "d.bin"
    path.write_bytes(b"HDR" + body + b"FOOTER")
    decoder = FixedLengthRecordDecoder(
        14, [("uint8", ()), (">u2", (2, 3), 2)], header_bytes=3, footer_bytes=6
    )
    assert decoder.dtypes == (np.dtype("uint8"), np.dtype("uint16"))
    assert decoder.shapes == ((), (2, 3))
    assert decoder.count_records(path) == 2
    got_labels, got_images = decoder.read_all(path)
    assert got_images.dtype == np.dtype("=u2")
    np.testing.assert_array_equal(got_labels, labels)
    np.testing.assert_array_equal(got_images, images)
    assert_items_equal(list(decoder.read_records(path)), [(labels[i, ...], images[i].astype("=u2")) for i in range(2)])
    assert_items_equal(list(decoder.read_batches(path, 1)), [(labels[:1], images[:1].astype("=u2")), (labels[1:], images[1:].astype("=u2"))])


def test_fixed_length_size_mismatch_names_the_file_and_the_numbers(tmp_path):
    path = tmp_path / "d.bin"
    path.write_bytes(bytes(2 + 3 * 10 + 4 + 1))
    decoder = FixedLengthRecordDecoder(10, [("uint8", (10,))], header_bytes=2, footer_bytes=1)
    with pytest.raises(DecodeError) as caught:
        decoder.read_all(path)
    assert str(caught.value) == (
        f"{path}: 37 bytes do not fit header_bytes=2 + N * record_bytes=10 + footer_bytes=1, "
        "since 4 bytes are left over after 3 records"
    )


def test_fixed_length_file_shorter_than_header_and_footer_is_an_error(tmp_path):
    path = tmp_path / "d.bin"
    path.write_bytes(bytes(3))
    decoder = FixedLengthRecordDecoder(4, [("uint8", (4,))], header_bytes=4)
    with pytest.raises(DecodeError, match="3 bytes do not fit .* 1 bytes too short even for N = 0"):
        decoder.read_all(path)


def test_fixed_length_file_with_no_records_gives_empty_arrays(tmp_path):
    path = tmp_path / "d.bin"
    path.write_bytes(b"HDR")
    decoder = FixedLengthRecordDecoder(4, [("int16", (2,))], header_bytes=3)
    assert list(decoder.read_records(path)) == []
    (values,) = decoder.read_all(path)
    assert values.shape == (0, 2) and values.dtype == np.int16


def test_fixed_length_component_past_the_record_end_is_rejected():
    with pytest.raises(ValueError, match=r"component 1 \(uint8 of shape \(3,\), 3 bytes at offset 2\) ends at byte 5, past record_bytes=4"):
        FixedLengthRecordDecoder(4, [("uint16", ()), ("uint8", (3,))])


# --------------------------------------------------------------------------- .npy


def test_npy_items_are_the_slices_along_axis_0(tmp_path):
    array = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
    path = tmp_path / "d.npy"
    np.save(path, array)
    decoder = NpyDecoder(dtype="float32", shape=(3,))
    records = list(decoder.read_records(path))
    assert len(records) == 10 and all(type(record[0]) is np.ndarray for record in records)
    np.testing.assert_array_equal(np.stack([record[0] for record in records]), array)
    batches = list(decoder.read_batches(path, 4))
    assert [len(batch[0]) for batch in batches] == [4, 4, 2]
    assert all(type(batch[0]) is np.ndarray for batch in batches)
    np.testing.assert_array_equal(decoder.read_all(path)[0], array)


def test_npy_object_array_is_rejected_without_unpickling(tmp_path):
    path = tmp_path / "d.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DecodeError, match="holds Python objects, which are never unpickled"):
        NpyDecoder().read_all(path)


def test_npy_dtype_and_shape_are_checked_not_cast(tmp_path):
    path = tmp_path / "d.npy"
    np.save(path, np.zeros((4, 2), np.float64))
    with pytest.raises(DecodeError, match="holds float64 values, but the decoder expects float32"):
        NpyDecoder(dtype="float32").read_all(path)
    with pytest.raises(DecodeError, match=r"holds items of shape \(2,\), but the decoder expects \(3,\)"):
        NpyDecoder(shape=(3,)).read_all(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"PK\x03\x04rest", "is an .npz archive"), (b"hello", "is not a .npy file")],
)
def test_npy_decoder_rejects_other_files(tmp_path, content, message):
    path = tmp_path / "d.npy"
    path.write_bytes(content)
    with pytest.raises(DecodeError, match=message):
        NpyDecoder().read_all(path)


def test_npy_0d_array_is_rejected(tmp_path):
    path = tmp_path / "d.npy"
    np.save(path, np.float32(1))
    with pytest.raises(DecodeError, match="holds a 0-d array"):
        NpyDecoder().read_all(path)


def test_batch_size_must_be_a_positive_int(tmp_path):
    with pytest.raises(ValueError, match="batch_size must be at least 1, not 0"):
        NpyDecoder().read_batches(tmp_path / "d.npy", 0)
    with pytest.raises(TypeError, match="batch_size must be an int"):
        NpyDecoder().read_batches(tmp_path / "d.npy", 2.0)


# --------------------------------------------------------------------------- file names


def make_files(directory, names):
    for name in names:
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text("x")
    return [str(directory / name) for name in names]


def test_list_files_sorts_each_pattern_and_keeps_the_pattern_order(tmp_path):
    make_files(tmp_path, ["b-1.csv", "b-0.csv", "a-0.csv", "sub/c.csv"])
    (tmp_path / "dir.csv").mkdir()
    files = list_files([tmp_path / "b-*.csv", str(tmp_path / "*.csv"), str(tmp_path / "**" / "c.csv")])
    assert files == [str(tmp_path / name) for name in ["b-0.csv", "b-1.csv", "a-0.csv", "sub/c.csv"]]


def test_list_files_takes_an_existing_file_name_literally(tmp_path):
    (path,) = make_files(tmp_path, ["shard[1].csv"])
    assert list_files(path) == [path]


def test_list_files_error_names_the_pattern_that_matches_nothing(tmp_path):
    make_files(tmp_path, ["a.csv"])
    pattern = str(tmp_path / "train-*.csv")
    with pytest.raises(FileNotFoundError, match=re.escape(f"file pattern '{pattern}' matches no files") + "$"):
        list_files([tmp_path / "a.csv", pattern])


def test_filename_epochs_yield_every_file_once_per_epoch(tmp_path):
    files = make_files(tmp_path, [f"f{i}.csv" for i in range(5)])
    names = list(filename_epochs(str(tmp_path / "*.csv"), num_epochs=3, seed=1))
    assert len(names) == 15
    for epoch in range(3):
        assert sorted(names[epoch * 5 : (epoch + 1) * 5]) == files


def test_filename_epochs_shuffle_is_reproducible_with_a_seed_and_new_each_epoch(tmp_path):
    make_files(tmp_path, [f"f{i}.csv" for i in range(8)])
    pattern = str(tmp_path / "*.csv")
    first = list(filename_epochs(pattern, num_epochs=4, seed=42))
    again = list(filename_epochs(pattern, num_epochs=4, seed=42))
    other = list(filename_epochs(pattern, num_epochs=4, seed=43))
    assert first == again
    assert first != other
    epochs = [tuple(first[i : i + 8]) for i in range(0, 32, 8)]
    assert len(set(epochs)) > 1


def test_filename_epochs_without_shuffle_repeat_the_sorted_order(tmp_path):
    files = make_files(tmp_path, ["b.csv", "a.csv"])
    assert list(filename_epochs(str(tmp_path / "*.csv"), num_epochs=2, shuffle=False)) == sorted(files) * 2


def test_filename_epochs_repeat_forever_without_num_epochs(tmp_path):
    make_files(tmp_path, ["a.csv", "b.csv"])
    names = list(itertools.islice(filename_epochs(str(tmp_path / "*.csv"), seed=0), 101))
    assert len(names) == 101


def test_filename_epochs_check_their_arguments_at_the_call(tmp_path):
    make_files(tmp_path, ["a.csv"])
    with pytest.raises(ValueError, match="num_epochs must be at least 1, not 0"):
        filename_epochs(str(tmp_path / "*.csv"), num_epochs=0)
    with pytest.raises(FileNotFoundError, match="matches no files"):
        filename_epochs(str(tmp_path / "*.bin"))


def test_shard_files_deals_files_round_robin(tmp_path):
    files = [f"f{i}" for i in range(5)]
    assert shard_files(files, 0, 2) == ["f0", "f2", "f4"]
    assert shard_files(files, 1, 2) == ["f1", "f3"]


def test_shard_files_rejects_a_replica_that_would_get_no_file():
    with pytest.raises(ValueError, match="replica 2 of 3 gets no files, since only 2 were given; use at most 2 replicas"):
        shard_files(["a", "b"], 2, 3)
    with pytest.raises(ValueError, match=r"replica 3 is out of range for 3 replicas \(0 to 2\)"):
        shard_files(["a", "b", "c"], 3, 3)
