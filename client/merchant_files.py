"""The merchant agent's inputs: the merchant's log and catalog, and its node's state directory,
read with one-line errors the merchant can act on (`CliError`: exit status 2)."""

from __future__ import annotations

import argparse
import csv
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from pydantic import ValidationError

from client.node_state import GLOBAL_MODEL_FILE, NodeState
from client.privacy.ledger import LEDGER_FILE, PrivacyLedger, PrivacyRefusal
from client.user_step import AnyUserStep, SGDUserStep
from shared.content_affinity import ContentBlend
from shared.data.loaders import load_catalog_file, load_log_file, load_log_with_own_catalog
from shared.data.log_formats import accepted_formats_text
from shared.data.schema import AdCatalog, DataValidationError, FileFormatError, InteractionLog
from shared.params import check_global_arrays, stored_shapes
from shared.storage import load_npz
from shared.wire import AD_BIAS, Arrays

Loaded = TypeVar("Loaded")


class CliError(Exception):
    """A failure the user can act on: printed as one line (a log in no accepted format adds the
    accepted formats below it), exit status 2."""


def load_catalog(path: str) -> AdCatalog:
    try:
        return load_catalog_file(path)
    except DataValidationError as exc:
        raise CliError(str(exc)) from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise CliError(f"{path}: not a readable CSV file ({exc})") from None


def load_log(path: str, catalog: AdCatalog, strict: bool = True) -> InteractionLog:
    return _read_log(path, lambda: load_log_file(path, catalog, strict=strict))


def load_log_alone(path: str) -> tuple[AdCatalog, InteractionLog]:
    """A log given without a catalog, mapped onto its own ads (as a simulation without
    catalog-path reads it), and that catalog."""
    dataset = _read_log(path, lambda: load_log_with_own_catalog(path))
    return dataset.catalog, dataset.log


def _read_log(path: str, load: Callable[[], Loaded]) -> Loaded:
    """`load()`, its errors as CliErrors; a log in no accepted format is shown those formats."""
    try:
        return load()
    except FileFormatError as exc:
        raise CliError(f"{exc}\n{accepted_formats_text()}") from None
    except DataValidationError as exc:
        raise CliError(str(exc)) from None
    except (UnicodeDecodeError, csv.Error) as exc:  # not a text CSV at all: the loader has no line for it
        raise CliError(f"{path}: not a readable CSV file ({exc})") from None


def open_state(directory: str) -> NodeState:
    # NodeState creates its directory; a tool that only reads must not leave an empty one behind.
    if not Path(directory).is_dir():
        raise CliError(f"{directory}: state directory does not exist")
    return NodeState(directory)


def load_global_model(state: NodeState, catalog: AdCatalog) -> tuple[Arrays, int]:
    try:
        loaded = state.load_global_model()
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise CliError(f"{state.directory / GLOBAL_MODEL_FILE}: unreadable ({exc})") from None
    if loaded is None:
        raise CliError(f"{state.directory}: no global model yet (train at least one round with this state directory)")
    arrays, server_round = loaded
    ad_rows = arrays.get(AD_BIAS)
    if ad_rows is None or ad_rows.ndim != 1:
        raise CliError(f"{state.directory / GLOBAL_MODEL_FILE}: holds no [ads] array '{AD_BIAS}'")
    if ad_rows.shape[0] != len(catalog):
        raise CliError(
            f"{state.directory}: the global model has {ad_rows.shape[0]} ad rows, the catalog {catalog.source} has {len(catalog)} ads: "
            "not the catalog this model was trained on"
        )
    try:
        check_global_arrays(arrays, stored_shapes(arrays))
    except ValueError as exc:
        raise CliError(f"{state.directory / GLOBAL_MODEL_FILE}: {exc}") from None
    return arrays, server_round


def load_stored_factors(state: NodeState, dim: int) -> dict[str, np.ndarray]:
    """Every stored user's factor row, keyed by user id ({} when none is stored).

    Read directly: NodeState.load_user_factors gives zeros for users it does not know, and
    here a missing user must be told apart from a stored one."""
    if not state.user_factors_path.is_file():
        return {}
    try:
        stored = load_npz(state.user_factors_path)
        user_ids, factors = stored["user_ids"], stored["factors"]
    except (OSError, ValueError, KeyError) as exc:
        raise CliError(f"{state.user_factors_path}: unreadable ({exc})") from None
    if factors.ndim != 2 or factors.shape[0] != len(user_ids):
        raise CliError(f"{state.user_factors_path}: {len(user_ids)} user ids for factors of shape {factors.shape}")
    if factors.shape[1] != dim:
        raise CliError(
            f"{state.user_factors_path}: holds {factors.shape[1]}-dim user factors, the global model has {dim}; "
            "the next training round refits them"
        )
    return {str(uid): factors[i] for i, uid in enumerate(user_ids.tolist())}


def load_budget(state_dir: str) -> dict[str, Any]:
    directory = Path(state_dir)
    if not directory.is_dir():
        raise CliError(f"{directory}: state directory does not exist")
    if not (directory / LEDGER_FILE).is_file():
        # PrivacyLedger.open would start a fresh ledger here; for a report that would claim
        # "nothing spent" about a directory whose history is simply unknown.
        raise CliError(f"{directory / LEDGER_FILE}: no privacy ledger (this state directory has not trained, or the ledger was lost)")
    try:
        ledger = PrivacyLedger.open(directory)
    except PrivacyRefusal as exc:
        raise CliError(str(exc)) from None
    return {"state_dir": str(directory), **ledger.summary()}


def load_content_blend(state: NodeState) -> ContentBlend | None:
    """How the run ranked with content affinity, recorded with the model (None: by the model alone)."""
    try:
        return state.load_content_blend()
    except ValueError as exc:
        raise CliError(f"{state.directory / GLOBAL_MODEL_FILE}: unreadable content blend ({exc})") from None


def load_user_step(state: NodeState, args: argparse.Namespace) -> AnyUserStep:
    """The user step recorded with the model (a model saved without one was trained by SGD, the
    only solver then), with the settings given on the command line taking precedence."""
    try:
        step = state.load_user_step() or SGDUserStep()
    except ValueError as exc:
        raise CliError(f"{state.directory / GLOBAL_MODEL_FILE}: unreadable user step ({exc})") from None
    flags = {"user_l2": "--user-l2", "negatives": "--negatives", "iters": "--solver-iters"}
    given = {"user_l2": args.user_l2, "negatives": args.negatives, "iters": args.solver_iters}
    try:
        return type(step).model_validate({**step.model_dump(), **{k: v for k, v in given.items() if v is not None and k in type(step).model_fields}})
    except ValidationError as exc:
        error = exc.errors()[0]
        raise CliError(f"{flags[str(error['loc'][0])]}: {error['msg']} (got {error['input']!r})") from None
