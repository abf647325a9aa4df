"""Demographic attributes of a public data set's users, for fairness reports across user groups
(issue 18: accuracy by age, gender and occupation). Never a training input: no model reads them.

MovieLens-100K's `u.user` is `user id | age | gender | occupation | zip code`; its user ids are
the very strings `shared.data.public_sets.load_movielens_100k` gives the log's users, so the
attributes join on `UserSplit.user_ids`. Read from ../shared/data, never copied into the repository.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shared.data.fields import require_id, require_text, utf8_lines
from shared.data.schema import DataValidationError, FileFormatError

USER_FILE = "u.user"
OCCUPATION_FILE = "u.occupation"
GENDERS = ("M", "F")  # u.user's only codes (the README of ml-100k)
MIN_AGE, MAX_AGE = 1, 120  # a year-of-birth typed into the age, or a missing-value 0, is an error rather than a group

# MovieLens-1M's age bands (its README): (lowest age, label). ML-100K records exact ages; binning them
# as ML-1M does makes the two data sets' group reports comparable and keeps every group large enough to average.
AGE_BANDS = ((0, "under 18"), (18, "18-24"), (25, "25-34"), (35, "35-44"), (45, "45-49"), (50, "50-55"), (56, "56+"))
AGE_BAND_NAMES = tuple(label for _, label in AGE_BANDS)


@dataclass(frozen=True)
class UserAttributes:
    age: int
    gender: str  # "M" or "F"
    occupation: str

    @property
    def age_band(self) -> str:
        return age_band(self.age)


def age_band(age: int) -> str:
    """The MovieLens-1M band of an age in years: under 18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+."""
    if age < 0:
        raise ValueError(f"age {age} is negative")
    label = AGE_BANDS[0][1]
    for lowest, name in AGE_BANDS:
        if age >= lowest:
            label = name
    return label


def _occupations(folder: Path) -> frozenset[str] | None:
    """u.occupation's list, where the folder has it: an occupation outside it is a typo, not a new group."""
    path = folder / OCCUPATION_FILE
    if not path.is_file():
        return None
    return frozenset(raw.strip() for _, raw in utf8_lines(path) if raw.strip())


def load_movielens_users(folder: str | Path) -> dict[str, UserAttributes]:
    """`u.user` of a MovieLens-100K folder: user id -> age, gender, occupation (the zip code is dropped)."""
    folder = Path(folder)
    path = folder / USER_FILE
    where = str(path)
    if not path.is_file():
        raise DataValidationError(where, None, None, "MovieLens-100K file does not exist")
    known = _occupations(folder)
    users: dict[str, UserAttributes] = {}
    first_line: dict[str, int] = {}
    for line, raw in utf8_lines(path):
        if not raw.strip():
            continue
        fields = raw.rstrip("\r\n").split("|")
        if len(fields) != 5:
            raise FileFormatError(where, line, None, f"has {len(fields)} fields, expected 5 (user id | age | gender | occupation | zip code)")
        # the log loader's own id check, so that a user id means the same string in both files
        user = require_id(where, line, "user_id", fields[0])
        age_text = require_text(where, line, "age", fields[1])
        if not age_text.isascii() or not age_text.isdigit():
            raise DataValidationError(where, line, "age", f"{age_text!r} is not a whole number of years")
        age = int(age_text)
        if not MIN_AGE <= age <= MAX_AGE:
            raise DataValidationError(where, line, "age", f"{age} is outside [{MIN_AGE}, {MAX_AGE}]")
        gender = require_text(where, line, "gender", fields[2])
        if gender not in GENDERS:
            raise DataValidationError(where, line, "gender", f"{gender!r} is not one of {', '.join(GENDERS)}")
        occupation = require_text(where, line, "occupation", fields[3])
        if known is not None and occupation not in known:
            raise DataValidationError(where, line, "occupation", f"{occupation!r} is not listed in {folder / OCCUPATION_FILE}")
        if user in users:
            raise DataValidationError(where, line, "user_id", f"user {user!r} is listed twice (first on line {first_line[user]})")
        users[user] = UserAttributes(age, gender, occupation)
        first_line[user] = line
    if not users:
        raise DataValidationError(where, None, None, "lists no users")
    return users
