"""Permutation sets: greedy max-min Hamming selection, its guarantees, and the JSON file."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from ssl_cli.errors import UserError
from ssl_cli.pretext.handcrafted.permutations import (
    SCHEMA,
    hamming_matrix,
    load_permutations,
    min_pairwise_hamming,
    save_permutations,
    select_permutations,
)


def assert_valid_set(perms: np.ndarray, n: int, cells: int = 9) -> None:
    assert perms.shape == (n, cells) and perms.dtype == np.int64
    assert (np.sort(perms, axis=1) == np.arange(cells)).all(), "every row is a permutation of the cells"
    assert len({tuple(row) for row in perms.tolist()}) == n, "rows are distinct"


def test_hamming_matrix_matches_a_loop():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 4, size=(5, 9)), rng.integers(0, 4, size=(7, 9))
    expected = [[sum(x != y for x, y in zip(row_a, row_b)) for row_b in b.tolist()] for row_a in a.tolist()]
    assert hamming_matrix(a, b).tolist() == expected
    assert min_pairwise_hamming(np.array([[0, 1, 2], [1, 0, 2], [2, 1, 0]])) == 2


def test_701_permutations_reach_min_hamming_3():
    perms = select_permutations(701, min_hamming=3)
    assert_valid_set(perms, 701)
    assert min_pairwise_hamming(perms) >= 3


def test_a_small_set_reaches_a_higher_requested_minimum():
    perms = select_permutations(100, min_hamming=6, seed=1)
    assert_valid_set(perms, 100)
    assert min_pairwise_hamming(perms) >= 6


def test_selection_is_greedy_max_min_over_all_permutations():
    """Every row after the first is as far as any unchosen permutation from the rows before it."""
    perms = select_permutations(24, grid=2)  # all 24 permutations of a 2 x 2 grid
    assert_valid_set(perms, 24, cells=4)
    every = np.array(list(itertools.permutations(range(4))))
    for step in range(1, len(perms)):
        chosen = perms[:step]
        left = np.array([row for row in every.tolist() if row not in chosen.tolist()])
        best = hamming_matrix(left, chosen).min(axis=1).max()
        assert hamming_matrix(perms[step:step + 1], chosen).min() == best


def test_the_seed_decides_the_set():
    first = select_permutations(50, seed=3)
    assert np.array_equal(first, select_permutations(50, seed=3))
    assert not np.array_equal(first, select_permutations(50, seed=4))
    assert np.array_equal(first, select_permutations(80, seed=3)[:50]), "a larger set extends a smaller one"


def test_an_unreachable_minimum_says_what_was_reached():
    reached = min_pairwise_hamming(select_permutations(1000))
    with pytest.raises(UserError) as error:
        select_permutations(1000, min_hamming=reached + 1)
    message = str(error.value)
    assert f"only {reached}" in message and "lower min_hamming" in message and "at most" in message
    with pytest.raises(UserError, match="only 2"):
        select_permutations(24, grid=2, min_hamming=3)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"n": 1}, "2..362880"),
    ({"n": 25, "grid": 2}, "2..24"),
    ({"n": 10, "grid": 4}, "grid must be one of 2, 3"),
    ({"n": 10, "min_hamming": 10}, "0..9"),
    ({"n": 10, "seed": -1}, "seed"),
])
def test_bad_arguments_are_user_errors(kwargs, fragment):
    with pytest.raises(UserError, match=fragment):
        select_permutations(**kwargs)


def test_save_and_load_round_trip(tmp_path: Path):
    perms = select_permutations(30, seed=2)
    path = save_permutations(tmp_path / "sets" / "perms.json", perms, min_pairwise_hamming(perms), seed=2)
    document = json.loads(path.read_text())
    assert document["schema"] == SCHEMA and document["grid"] == 3 and document["n"] == 30
    assert document["seed"] == 2 and document["min_hamming"] == min_pairwise_hamming(perms)
    loaded = load_permutations(path)
    assert loaded.dtype == np.int64 and np.array_equal(loaded, perms)
    assert [p.name for p in path.parent.iterdir()] == ["perms.json"], "no temporary file left behind"


GOOD = {"schema": SCHEMA, "grid": 3, "n": 2, "min_hamming": 2, "seed": 0,
        "permutations": [[0, 1, 2, 3, 4, 5, 6, 7, 8], [1, 0, 2, 3, 4, 5, 6, 7, 8]]}


@pytest.mark.parametrize("change, fragment", [
    ({"schema": "ssl-cli/features@1.0"}, "expected 'ssl-cli/permutations@1.0'"),
    ({"permutations": [[0, 1, 2, 3, 4, 5, 6, 7, 9], [1, 0, 2, 3, 4, 5, 6, 7, 8]]}, "row 0 .* not a permutation"),
    ({"permutations": [[1, 0, 2, 3, 4, 5, 6, 7, 8], [1, 0, 2, 3, 4, 5, 6, 7, 8]]}, "row 1 repeats"),
    ({"permutations": [[0, 1, 2, 3, 4, 5, 6, 7, 8], [1, 0, 2, 3]]}, "row lengths"),
    ({"permutations": "0 1 2"}, "list of lists of integers"),
    ({"n": 5}, "n = 5 but holds 2 rows"),
    ({"n": 1, "permutations": [[0, 1, 2, 3, 4, 5, 6, 7, 8]]}, "at least 2"),
])
def test_bad_files_say_what_is_wrong(tmp_path: Path, change, fragment):
    path = tmp_path / "perms.json"
    path.write_text(json.dumps(GOOD | change))
    with pytest.raises(UserError, match=fragment) as error:
        load_permutations(path)
    assert "ssl permutations" in str(error.value), "the message says how to get a good file"


def test_npy_is_a_plain_array_and_loads_like_json(tmp_path: Path):
    perms = select_permutations(30, seed=2)
    reached = min_pairwise_hamming(perms)
    npy = save_permutations(tmp_path / "perms.npy", perms, reached, seed=2)
    array = np.load(npy)  # plain numpy reads it: no JSON inside a .npy name
    assert array.shape == (30, 9) and array.dtype == np.int64 and np.array_equal(array, perms)
    loaded = load_permutations(npy)
    assert loaded.dtype == np.int64 and np.array_equal(loaded, load_permutations(
        save_permutations(tmp_path / "perms.json", perms, reached, seed=2)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["perms.json", "perms.npy"], "no temporary file left behind"
    # the content decides, not the name: JSON that an older `ssl permutations --out X.npy` wrote still loads
    legacy = tmp_path / "legacy.npy"
    legacy.write_text(json.dumps(GOOD))
    assert load_permutations(legacy).tolist() == GOOD["permutations"]


@pytest.mark.parametrize("array, fragment", [
    (np.array([[0.0, 1, 2, 3, 4, 5, 6, 7, 8], [1, 0, 2, 3, 4, 5, 6, 7, 8]]), "float64 array"),
    (np.arange(9), r"shape \(9,\)"),
    (np.array([[0, 1, 2, 3, 4], [1, 0, 2, 3, 4]]), r"shape \(2, 5\)"),
    (np.array([[1, 0, 2, 3, 4, 5, 6, 7, 8], [1, 0, 2, 3, 4, 5, 6, 7, 8]]), "row 1 repeats"),
    (np.array([[0, 1, 2, 3, 4, 5, 6, 7, 9], [1, 0, 2, 3, 4, 5, 6, 7, 8]], dtype=np.int8), "row 0 .* not a permutation"),
])
def test_bad_npy_arrays_say_what_is_wrong(tmp_path: Path, array: np.ndarray, fragment: str):
    path = tmp_path / "perms.npy"
    np.save(path, array)
    with pytest.raises(UserError, match=fragment) as error:
        load_permutations(path)
    assert "ssl permutations" in str(error.value)


def test_cli_writes_json_or_npy_and_refuses_other_names(cli, tmp_path: Path):
    from ssl_cli.pretext.handcrafted.jigsaw import JigsawTask

    for name in ("p.json", "p.npy"):
        result = cli("permutations", "--n", 10, "--out", tmp_path / name)
        assert result.exit_code == 0, result.output
        task = JigsawTask(image_size=48, permutation_file=tmp_path / name)
        assert np.array_equal(task.permutations, select_permutations(10))
    assert np.load(tmp_path / "p.npy").shape == (10, 9)
    result = cli("permutations", "--n", 10, "--out", tmp_path / "p.txt")
    assert result.exit_code == 2 and result.output.strip().count("\n") == 0, result.output
    assert result.output.startswith("error: ") and ".json" in result.output and ".npy" in result.output
    assert not (tmp_path / "p.txt").exists()


def test_missing_and_garbled_files(tmp_path: Path):
    with pytest.raises(UserError, match="does not exist"):
        load_permutations(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not readable JSON"):
        load_permutations(tmp_path / "bad.json")
