"""User attributes for fairness reports (issue 18, item 4): u.user's parsing and its errors, the
age bands, and per-user metrics that average to exactly what the harness's evaluation reports.

Every u.user here is hand-written fake rows; the real file is only read where it lies (../shared/data).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client.node_data import NodeData
from shared.data.public_sets import load_movielens_100k
from shared.data.schema import DataValidationError, FileFormatError
from shared.data.synthetic import SyntheticSpec, generate
from shared.data.user_attributes import AGE_BAND_NAMES, UserAttributes, age_band, load_movielens_users
from shared.metrics import METRIC_NAMES, NUM_TEST_USERS, evaluate, per_user_metrics
from shared.params import init_global_arrays, score_all

FAKE_USERS = [
    "1|30|F|pilot|00001",
    "2|17|M|juggler|A1B2C",  # zip codes are not always numbers (Canada): never parsed
    "",  # blank lines carry no row
    "10|56|M|pilot|99999",
]


def fake_folder(tmp_path: Path, lines: list[str], occupations: list[str] | None = None) -> Path:
    folder = tmp_path / "ml-fake"
    folder.mkdir(exist_ok=True)
    (folder / "u.user").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if occupations is not None:
        (folder / "u.occupation").write_text("\n".join(occupations) + "\n", encoding="utf-8")
    return folder


def test_fake_u_user_parses(tmp_path):
    users = load_movielens_users(fake_folder(tmp_path, FAKE_USERS))
    assert users == {
        "1": UserAttributes(30, "F", "pilot"),
        "2": UserAttributes(17, "M", "juggler"),
        "10": UserAttributes(56, "M", "pilot"),
    }
    assert [users[u].age_band for u in ("1", "2", "10")] == ["25-34", "under 18", "56+"]


def test_user_ids_are_the_log_loaders_strings(tmp_path):
    # the log loader strips ids; the attributes must join on the same strings
    users = load_movielens_users(fake_folder(tmp_path, [" 7 |40|F|pilot|00001"]))
    assert list(users) == ["7"]


@pytest.mark.parametrize(
    ("bad_line", "error", "field_name", "words"),
    [
        ("3|40|F|pilot", FileFormatError, None, "has 4 fields, expected 5"),
        ("3|forty|F|pilot|00001", DataValidationError, "age", "not a whole number"),
        ("3|0|F|pilot|00001", DataValidationError, "age", "outside"),
        ("3|1975|F|pilot|00001", DataValidationError, "age", "outside"),
        ("3|40|X|pilot|00001", DataValidationError, "gender", "not one of M, F"),
        ("3|40|F| |00001", DataValidationError, "occupation", "is empty"),
        ("|40|F|pilot|00001", DataValidationError, "user_id", "is empty"),
        ("nan|40|F|pilot|00001", DataValidationError, "user_id", "missing value"),
        ("1|40|F|pilot|00001", DataValidationError, "user_id", "listed twice (first on line 1)"),
    ],
)
def test_malformed_row_names_file_line_and_field(tmp_path, bad_line, error, field_name, words):
    folder = fake_folder(tmp_path, ["1|30|F|pilot|00001", "2|17|M|juggler|00002", bad_line])
    with pytest.raises(error) as raised:
        load_movielens_users(folder)
    assert raised.value.path == str(folder / "u.user")
    assert raised.value.line == 3
    assert raised.value.field_name == field_name
    assert words in str(raised.value) and "u.user:3:" in str(raised.value)


def test_occupation_outside_u_occupation_is_an_error(tmp_path):
    folder = fake_folder(tmp_path, ["1|30|F|pilot|00001", "2|17|M|jugler|00002"], occupations=["pilot", "juggler"])
    with pytest.raises(DataValidationError, match=r"u\.user:2: field 'occupation' 'jugler' is not listed"):
        load_movielens_users(folder)


def test_missing_or_empty_file(tmp_path):
    with pytest.raises(DataValidationError, match="does not exist"):
        load_movielens_users(tmp_path)
    with pytest.raises(DataValidationError, match="lists no users"):
        load_movielens_users(fake_folder(tmp_path, [""]))


@pytest.mark.parametrize(
    ("age", "band"),
    [(1, "under 18"), (17, "under 18"), (18, "18-24"), (24, "18-24"), (25, "25-34"), (34, "25-34"), (35, "35-44"),
     (44, "35-44"), (45, "45-49"), (49, "45-49"), (50, "50-55"), (55, "50-55"), (56, "56+"), (90, "56+")],
)
def test_age_bands_are_movielens_1m(age, band):
    assert age_band(age) == band


def test_age_band_names_in_order_and_negative_age_refused():
    assert AGE_BAND_NAMES == ("under 18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")
    with pytest.raises(ValueError, match="negative"):
        age_band(-1)


@pytest.fixture(scope="module")
def scored_shard():
    dataset = generate(SyntheticSpec(users=300, ads=150, merchants=2, seed=11))[0]
    data = NodeData.prepare(dataset.log, dataset.catalog, seed=3)
    arrays = init_global_arrays(len(dataset.catalog), 8, seed=5)
    factors = np.random.default_rng(7).standard_normal((data.num_users, 8))
    return data, arrays, factors


def test_per_user_means_equal_evaluate_exactly(scored_shard):
    data, arrays, factors = scored_shard
    score_fn = lambda users: score_all(factors[users], arrays)  # noqa: E731
    means = evaluate(score_fn, data.split, data.eval_negatives)
    per_user = per_user_metrics(score_fn, data.split, data.eval_negatives)
    assert np.array_equal(per_user["user"], data.split.test_users)
    assert means[NUM_TEST_USERS] == len(per_user["user"]) > 100
    for name in METRIC_NAMES:
        assert len(per_user[name]) == len(data.split.test_users)
        assert float(per_user[name].mean()) == means[name], name  # one chunk: the very same sum
    assert data.evaluate(arrays, factors, None) == {**{n: float(per_user[n].mean()) for n in METRIC_NAMES}, NUM_TEST_USERS: means[NUM_TEST_USERS]}


def test_per_user_metrics_do_not_depend_on_the_chunk(scored_shard):
    data, arrays, factors = scored_shard
    score_fn = lambda users: score_all(factors[users], arrays)  # noqa: E731
    whole = per_user_metrics(score_fn, data.split, data.eval_negatives)
    chunked = per_user_metrics(score_fn, data.split, data.eval_negatives, chunk=17)
    means = evaluate(score_fn, data.split, data.eval_negatives, chunk=17)
    assert np.array_equal(chunked["user"], whole["user"])
    for name in METRIC_NAMES:
        np.testing.assert_allclose(chunked[name], whole[name], rtol=1e-12, atol=1e-12)
        # several chunks: evaluate sums chunk by chunk, so equal up to the order of summation
        assert chunked[name].mean() == pytest.approx(means[name], rel=1e-12, abs=1e-15)


def test_per_user_metrics_without_test_users(scored_shard):
    data, _, _ = scored_shard
    split = data.split
    empty = type(split)(split.user_ids, split.num_ads, split.pos_offsets, split.pos_ads, split.imp_offsets, split.imp_ads,
                        np.full_like(split.test_ad, -1))
    result = per_user_metrics(lambda users: np.zeros((len(users), split.num_ads)), empty, data.eval_negatives)
    assert all(len(result[name]) == 0 for name in METRIC_NAMES) and len(result["user"]) == 0


def test_real_u_user_joins_the_movielens_log(real_data):
    folder = real_data / "movielens" / "ml-100k"
    if not (folder / "u.user").is_file():
        pytest.skip(f"{folder / 'u.user'} is absent")
    users = load_movielens_users(folder)
    assert len(users) == 943
    assert {a.gender for a in users.values()} == {"M", "F"}
    assert len({a.occupation for a in users.values()}) == 21
    assert {a.age_band for a in users.values()} == set(AGE_BAND_NAMES)
    # every user of the log has its attributes, under the very same id
    assert set(load_movielens_100k(folder).log.user) == set(users)
