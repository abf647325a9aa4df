"""fedads-merchant: the merchant's own offline tool, next to its log file and node state.

It runs on the merchant's machine and needs no server: it reads the merchant's interaction log,
the public ad catalog and the node's state directory (the one the ClientApp writes during
training: `global_model.npz`, `user_factors.npz`, `privacy_ledger.json`).

    python -m client.merchant_cli validate --log LOG --catalog CATALOG [--lenient]
        Check a log (CSV/Parquet) against the schema and the catalog; print what it holds.
    python -m client.merchant_cli budget --state-dir DIR [--json]
        The privacy spent and left, from the node's persisted accountant.
    python -m client.merchant_cli recommend --state-dir DIR --log LOG --catalog CATALOG
                                            [--users U ...] [--k 10] [--output FILE.csv]
        Top-K unseen ads per user: score = p_u . q_a + b_a with the latest global model and the
        locally stored user factors.
    python -m client.merchant_cli fold-in --state-dir DIR --log LOG --catalog CATALOG [--users U ...]
        Give users of the log who have no stored factors (or the given users) their factors now,
        with the client's exact user step against the current global model, without a round.

Nothing here talks to the network or changes the privacy ledger: the user step and serving are
local computations on the merchant's own data, and the global model is already public to it.
Exit status: 0 on success, 2 on any error, with a one-line `fedads-merchant: error: ...` on stderr.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence, TextIO

import numpy as np

from client.node_state import GLOBAL_MODEL_FILE, NodeState
from client.privacy_ledger import LEDGER_FILE, PrivacyLedger, PrivacyRefusal
from shared.config import RunConfig
from shared.data.loaders import load_catalog_file, load_log_file
from shared.data.schema import AdCatalog, DataValidationError, Event, InteractionLog
from shared.data.split import NO_TEST, UserSplit, leave_last_out
from shared.params import check_global_arrays
from shared.storage import load_npz

# torch (shared.model, client.trainer) is imported by recommend and fold-in only: `--help`,
# validate and budget answer without paying its seconds of start-up.

PROG = "fedads-merchant"
EXIT_OK, EXIT_ERROR = 0, 2
# Integer timestamps at or past this are shown as UTC dates too; smaller ones are more likely a
# position or another monotone clock (the Amazon loader uses sequence positions).
EPOCH_SECONDS_FROM = 10**8  # 1973-03-03


class CliError(Exception):
    """A failure the user can act on: printed as one line, exit status 2."""


# ====================================================================== loading inputs
def _load_catalog(path: str) -> AdCatalog:
    try:
        return load_catalog_file(path)
    except DataValidationError as exc:
        raise CliError(str(exc)) from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise CliError(f"{path}: not a readable CSV file ({exc})") from None


def _load_log(path: str, catalog: AdCatalog, strict: bool = True) -> InteractionLog:
    try:
        return load_log_file(path, catalog, strict=strict)
    except DataValidationError as exc:
        raise CliError(str(exc)) from None
    except (UnicodeDecodeError, csv.Error) as exc:  # not a text CSV at all: the loader has no line for it
        raise CliError(f"{path}: not a readable CSV file ({exc})") from None


def _state(directory: str) -> NodeState:
    # NodeState creates its directory; a tool that only reads must not leave an empty one behind.
    if not Path(directory).is_dir():
        raise CliError(f"{directory}: state directory does not exist")
    return NodeState(directory)


def _global_model(state: NodeState, catalog: AdCatalog) -> tuple[dict[str, np.ndarray], int]:
    try:
        loaded = state.load_global_model()
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise CliError(f"{state.directory / GLOBAL_MODEL_FILE}: unreadable ({exc})") from None
    if loaded is None:
        raise CliError(f"{state.directory}: no global model yet (train at least one round with this state directory)")
    arrays, server_round = loaded
    factors = arrays.get("ad_factors")
    if factors is None or factors.ndim != 2:
        raise CliError(f"{state.directory / GLOBAL_MODEL_FILE}: holds no [ads, factors] array 'ad_factors'")
    if factors.shape[0] != len(catalog):
        raise CliError(
            f"{state.directory}: the global model has {factors.shape[0]} ad rows, the catalog {catalog.source} has {len(catalog)} ads: "
            "not the catalog this model was trained on"
        )
    try:
        check_global_arrays(arrays, len(catalog), factors.shape[1])
    except ValueError as exc:
        raise CliError(f"{state.directory / GLOBAL_MODEL_FILE}: {exc}") from None
    return arrays, server_round


def _stored_factors(state: NodeState, dim: int) -> dict[str, np.ndarray]:
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


# ====================================================================== validate
def _format_time(value: int | None) -> str:
    if value is None:
        return "-"
    if value >= EPOCH_SECONDS_FROM:
        return f"{value} ({datetime.fromtimestamp(value, tz=timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')})"
    return str(value)


_QUOTED_VALUE = re.compile(r"^(field '[^']+') (?:'[^']*'|\"[^\"]*\") ")


def rejection_reasons(log: InteractionLog) -> dict[str, list[str]]:
    """Rejected rows grouped by reason: reason (without file, line and value) -> ['file:line', ...].

    The loader keeps one message per rejected row ("file:line: field 'ad_id' 'x' is not in the
    ad catalog"); grouping them makes a log with thousands of drops readable."""
    groups: dict[str, list[str]] = {}
    prefix = f"{log.source}:"
    for message in log.rejected:
        line, _, what = message[len(prefix):].partition(": ") if message.startswith(prefix) else ("?", "", message)
        where = f"{log.source}:{line}"
        groups.setdefault(_QUOTED_VALUE.sub(r"\1 ", what), []).append(where)
    return groups


def cmd_validate(args: argparse.Namespace, out: TextIO) -> int:
    catalog = _load_catalog(args.catalog)
    log = _load_log(args.log, catalog, strict=not args.lenient)
    s = log.summary()
    print(f"{args.log}: valid ({'lenient' if args.lenient else 'strict'}) against {args.catalog}", file=out)
    fields: list[tuple[str, object]] = [
        ("rows", s["rows"]), ("users", s["users"]), ("ads", f"{s['ads']} of {len(catalog)} in the catalog"),
        *((name, s["events"].get(name, 0)) for name in (e.name.lower() for e in Event)),
        ("first", _format_time(s["first_timestamp"])), ("last", _format_time(s["last_timestamp"])),
        ("rejected", s["rows_rejected"]),
    ]
    for label, value in fields:
        print(f"  {label + ':':<12}{value}", file=out)
    for reason, where in rejection_reasons(log).items():
        shown = ", ".join(where[:3]) + (", ..." if len(where) > 3 else "")
        print(f"    {len(where)} x {reason} (e.g. {shown})", file=out)
    return EXIT_OK


# ====================================================================== budget
def budget_report(state_dir: str) -> dict[str, Any]:
    directory = Path(state_dir)
    if not directory.is_dir():
        raise CliError(f"{directory}: state directory does not exist")
    if not (directory / LEDGER_FILE).is_file():
        # PrivacyLedger.open would start a fresh ledger here; for a report that would claim
        # "nothing spent" about a directory whose history is simply unknown.
        raise CliError(f"{directory / LEDGER_FILE}: no privacy ledger (this state directory has not trained, or the ledger was lost)")
    try:
        ledger = PrivacyLedger.open(directory, fail_closed=True)
    except PrivacyRefusal as exc:
        raise CliError(str(exc)) from None
    s = ledger.state
    spent = ledger.epsilon()
    guarantee = s.non_private_releases == 0
    remaining = None if s.target_epsilon is None or not guarantee else max(s.target_epsilon - spent, 0.0)
    return {
        "state_dir": str(directory),
        "dp_guarantee": guarantee,
        # JSON has no infinity: without a guarantee the spent epsilon is reported as null
        "epsilon_spent": spent if math.isfinite(spent) else None,
        "epsilon_remaining": remaining,
        "target_epsilon": s.target_epsilon,
        "delta": s.delta,
        "rounds_trained": s.rounds_trained,
        "noise_multiplier": s.noise_multiplier,
        # every DP-SGD step and every noised metric release is one Gaussian release; the
        # accountant merges runs of equal (noise, sample rate) into one history entry
        "releases": int(sum(n for _, _, n in s.history)),
        "accountant_entries": len(s.history),
        "non_private_releases": s.non_private_releases,
        "exact_metric_releases": s.exact_metric_releases,
        "accountant": s.accountant,
    }


def _show(value: Any, fmt: str = "") -> str:
    return "-" if value is None else format(value, fmt)


def cmd_budget(args: argparse.Namespace, out: TextIO) -> int:
    report = budget_report(args.state_dir)
    if args.json:
        json.dump(report, out, indent=2)
        print(file=out)
        return EXIT_OK
    r = report
    print(f"privacy budget of {r['state_dir']} ({r['accountant']} accountant)", file=out)
    if not r["dp_guarantee"]:
        print(f"  NO DP GUARANTEE: {r['non_private_releases']} release(s) were made without differential privacy", file=out)
    print(f"  epsilon spent:         {_show(r['epsilon_spent'], '.6g') if r['dp_guarantee'] else 'inf'}", file=out)
    print(f"  epsilon remaining:     {_show(r['epsilon_remaining'], '.6g')}", file=out)
    print(f"  target epsilon:        {_show(r['target_epsilon'], 'g')}", file=out)
    print(f"  delta:                 {_show(r['delta'], '.3g')}", file=out)
    print(f"  rounds trained:        {r['rounds_trained']}", file=out)
    print(f"  noise multiplier:      {_show(r['noise_multiplier'], '.6g')}", file=out)
    print(f"  releases:              {r['releases']} Gaussian ({r['accountant_entries']} accountant entries)", file=out)
    print(f"  non-private releases:  {r['non_private_releases']}", file=out)
    print(f"  exact metric releases: {r['exact_metric_releases']}", file=out)
    return EXIT_OK


# ====================================================================== recommend
@dataclass(frozen=True)
class Recommendation:
    user_id: str
    rank: int  # 1-based
    ad_id: str
    score: float


def seen_ads(log: InteractionLog, positives_only: bool = False) -> dict[str, set[int]]:
    """Catalog rows each user has a log row for (only clicks and purchases with positives_only)."""
    keep = log.event >= Event.CLICK if positives_only else np.ones(len(log), dtype=bool)
    seen: dict[str, set[int]] = {}
    for user, ad in zip(log.user[keep].tolist(), log.ad[keep].tolist()):
        seen.setdefault(str(user), set()).add(int(ad))
    return seen


def top_k(scores: np.ndarray, excluded: set[int], k: int) -> np.ndarray:
    """Rows of the k best scores outside `excluded`, best first; ties go to the lower row."""
    candidates = np.setdiff1d(np.arange(len(scores)), np.fromiter(excluded, dtype=np.int64, count=len(excluded)))
    order = np.lexsort((candidates, -scores[candidates]))
    return candidates[order[:k]]


def recommend(
    user_ids: Sequence[str], factors: dict[str, np.ndarray], arrays: dict[str, np.ndarray],
    catalog: AdCatalog, seen: dict[str, set[int]], k: int,
) -> list[Recommendation]:
    from shared.params import score_all

    if not user_ids:
        return []
    vectors = np.stack([factors[u] for u in user_ids])
    scores = score_all(vectors, arrays)
    out: list[Recommendation] = []
    for user, row in zip(user_ids, scores):
        for rank, ad in enumerate(top_k(row, seen.get(user, set()), k), start=1):
            out.append(Recommendation(user, rank, catalog.ad_ids[ad], float(row[ad])))
    return out


def _users_to_serve(requested: list[str] | None, log: InteractionLog, factors: dict[str, np.ndarray]) -> tuple[list[str], list[str]]:
    """(users to serve, users of the log skipped for lack of factors)."""
    if requested:
        unknown = [u for u in requested if u not in factors]
        if unknown:
            raise CliError(
                f"no stored factors for user(s) {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}: "
                "run `fold-in` for them first (if they are in the log), or train a round"
            )
        return list(dict.fromkeys(requested)), []
    in_log = sorted({str(u) for u in log.user.tolist()})
    return [u for u in in_log if u in factors], [u for u in in_log if u not in factors]


def _write_csv(path: str, recommendations: list[Recommendation]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["user_id", "rank", "ad_id", "score"])
        for r in recommendations:
            writer.writerow([r.user_id, r.rank, r.ad_id, format(r.score, ".9g")])


def _print_table(recommendations: list[Recommendation], catalog: AdCatalog, out: TextIO) -> None:
    width = max([len("user_id"), *(len(r.user_id) for r in recommendations)])
    ad_width = max([len("ad_id"), *(len(r.ad_id) for r in recommendations)])
    print(f"{'user_id':<{width}}  {'rank':>4}  {'ad_id':<{ad_width}}  {'score':>10}  category", file=out)
    for r in recommendations:
        category = catalog.categories[catalog.index[r.ad_id]]
        print(f"{r.user_id:<{width}}  {r.rank:>4}  {r.ad_id:<{ad_width}}  {r.score:>10.4f}  {category}", file=out)


def cmd_recommend(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if args.k < 1:
        raise CliError(f"--k must be at least 1, got {args.k}")
    catalog = _load_catalog(args.catalog)
    log = _load_log(args.log, catalog, strict=not args.lenient)
    state = _state(args.state_dir)
    arrays, server_round = _global_model(state, catalog)
    factors = _stored_factors(state, arrays["ad_factors"].shape[1])
    if not factors:
        raise CliError(f"{state.user_factors_path}: no user factors stored yet: train a round, or run `fold-in` for the log's users")
    users, skipped = _users_to_serve(args.users, log, factors)
    if skipped:
        print(f"note: {len(skipped)} user(s) of the log have no stored factors and get no recommendations "
              f"(e.g. {', '.join(skipped[:3])}); run `fold-in` to serve them", file=err)
    if not users:
        raise CliError(f"none of the users of {args.log} has stored factors in {state.directory}: run `fold-in` first")
    not_in_log = sorted(set(users) - {str(u) for u in log.user.tolist()})
    if not_in_log:
        print(f"note: {len(not_in_log)} user(s) have no rows in {args.log}: nothing is excluded for them", file=err)
    recommendations = recommend(users, factors, arrays, catalog, seen_ads(log, args.exclude == "positives"), args.k)
    if args.output:
        _write_csv(args.output, recommendations)
        print(f"wrote {len(recommendations)} recommendations for {len(users)} user(s) to {args.output} "
              f"(global model of round {server_round})", file=out)
    else:
        _print_table(recommendations, catalog, out)
    return EXIT_OK


# ====================================================================== fold-in
def serving_split(log: InteractionLog, num_ads: int) -> UserSplit:
    """The training split's per-user rows (deduplicated positives, impressions without a
    positive as explicit negatives) with nothing held out: fold-in serves users, it does not
    evaluate them, and a user's latest positive is the most telling one."""
    split = leave_last_out(log, num_ads)
    groups = [
        np.append(split.positives(u), split.test_ad[u]) if split.test_ad[u] != NO_TEST else split.positives(u)
        for u in range(split.num_users)
    ]
    offsets = np.zeros(split.num_users + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(g) for g in groups])
    pos_ads = np.concatenate(groups).astype(np.int64) if groups else np.zeros(0, dtype=np.int64)
    return UserSplit(
        user_ids=split.user_ids, num_ads=num_ads, pos_offsets=offsets, pos_ads=pos_ads,
        imp_offsets=split.imp_offsets, imp_ads=split.imp_ads, test_ad=np.full(split.num_users, NO_TEST, dtype=np.int64),
    )


def fold_in_factors(
    log: InteractionLog, arrays: dict[str, np.ndarray], users: Sequence[str], step: dict[str, Any],
) -> dict[str, np.ndarray]:
    """Factors of `users` from their rows of `log`, against the frozen global parameters, with
    the user step training used (`step`, recorded with the global model): ALS's closed form, or
    LocalTrainer.fit_users' (build_user_rows without a positive cap, then solve_user_factors
    from zero, as training starts a user it has no factors for)."""
    rows = np.flatnonzero(np.isin(log.user.astype(str), np.asarray(list(users), dtype=str)))
    split = serving_split(log.subset(rows), arrays["ad_factors"].shape[0])
    if step["solver"] == "als":
        from shared.als import ALSSettings, Rows, solve_users

        settings = ALSSettings(alpha0=step["alpha0"], user_l2=step["user_l2"], ad_l2=1.0, max_rows=None, user_clip=1.0,
                               gram_mode="per-ad", clip=False)
        factors = solve_users(Rows.from_split(split), arrays["ad_factors"], arrays["ad_bias"], settings)
        return {str(uid): factors[i].astype(np.float32) for i, uid in enumerate(split.user_ids.tolist())}
    return _fold_in_sgd(split, arrays, negatives=step["negatives"], user_l2=step["user_l2"], iters=step["iters"], seed=step["seed"])


def _fold_in_sgd(
    split: UserSplit, arrays: dict[str, np.ndarray], *, negatives: int, user_l2: float, iters: int, seed: int
) -> dict[str, np.ndarray]:
    import torch

    from client.sgd_step import build_user_rows
    from shared.model import solve_user_factors

    user_rows = build_user_rows(split, np.random.default_rng(seed), negatives, max_positives=None)
    factors = solve_user_factors(
        torch.as_tensor(arrays["ad_factors"]), torch.as_tensor(arrays["ad_bias"]),
        user_rows.ads, user_rows.labels, user_rows.mask, l2=user_l2, iters=iters,
    ).numpy()
    return {str(uid): factors[i] for i, uid in enumerate(split.user_ids.tolist())}


def cmd_fold_in(args: argparse.Namespace, out: TextIO) -> int:
    catalog = _load_catalog(args.catalog)
    log = _load_log(args.log, catalog, strict=not args.lenient)
    state = _state(args.state_dir)
    arrays, server_round = _global_model(state, catalog)
    dim = arrays["ad_factors"].shape[1]
    stored = _stored_factors(state, dim)
    in_log = sorted({str(u) for u in log.user.tolist()})
    if args.users:
        missing = sorted(set(args.users) - set(in_log))
        if missing:
            raise CliError(f"user(s) {', '.join(missing[:5])} have no rows in {args.log}: nothing to fold in from")
        users = list(dict.fromkeys(args.users))  # explicitly named users are refitted even if stored
    else:
        users = [u for u in in_log if u not in stored]
    if not users:
        print(f"folded in 0 users: every user of {args.log} already has factors in {state.directory}", file=out)
        return EXIT_OK
    folded = fold_in_factors(log, arrays, users, _user_step(state, args))
    merged = {**stored, **folded}
    ids = np.array(list(merged), dtype=str)
    state.save_user_factors(ids, np.stack([merged[u] for u in ids.tolist()]).astype(np.float32))
    print(f"folded in {len(folded)} user(s) against the global model of round {server_round} "
          f"({dim} factors); {len(merged)} user(s) stored in {state.user_factors_path}", file=out)
    return EXIT_OK


def _user_step(state: NodeState, args: argparse.Namespace) -> dict[str, Any]:
    """The recorded user step of the model (a model saved without one was trained by SGD, the
    only solver then), with the settings given on the command line taking precedence."""
    defaults = RunConfig()
    step = state.load_user_step() or {"solver": "sgd"}
    if step["solver"] == "als":
        step.setdefault("alpha0", defaults.als_alpha0)
        step["user_l2"] = args.user_l2 if args.user_l2 is not None else step.get("user_l2", defaults.als_user_l2)
        return step
    step["user_l2"] = args.user_l2 if args.user_l2 is not None else step.get("user_l2", defaults.user_l2)
    step["negatives"] = args.negatives if args.negatives is not None else step.get("negatives", defaults.negatives)
    step["iters"] = args.solver_iters if args.solver_iters is not None else step.get("iters", defaults.user_solver_iters)
    step["seed"] = args.seed
    return step


# ====================================================================== command line
def build_parser() -> argparse.ArgumentParser:
    defaults = RunConfig()
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="The merchant's offline tool: validate logs, read the privacy budget, serve and fold in users.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def data_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--log", required=True, help="interaction log (CSV or Parquet: user_id, ad_id, timestamp[, event, merchant, region])")
        p.add_argument("--catalog", required=True, help="ad catalog (CSV or Parquet: ad_id, category[, brand, title])")
        p.add_argument("--lenient", action="store_true", help="drop rows whose ad is not in the catalog instead of failing")

    p = commands.add_parser("validate", help="check a log against the schema and the catalog and summarize it")
    data_args(p)

    p = commands.add_parser("budget", help="privacy spent and remaining, from the node's ledger")
    p.add_argument("--state-dir", required=True, help="the node's state directory")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = commands.add_parser("recommend", help="top-K unseen ads per user from the latest global model")
    p.add_argument("--state-dir", required=True, help="the node's state directory")
    data_args(p)
    p.add_argument("--users", nargs="+", metavar="USER", help="users to serve (default: every user of the log with stored factors)")
    p.add_argument("--k", type=int, default=10, help="ads per user (default 10)")
    p.add_argument("--output", metavar="FILE.csv", help="write user_id, rank, ad_id, score as CSV instead of printing a table")
    p.add_argument("--exclude", choices=("all", "positives"), default="all",
                   help="ads not to recommend again: any the user has a log row for (all, default), or only clicked/purchased ones")

    p = commands.add_parser("fold-in", help="compute factors for new users of the log now, without a training round")
    p.add_argument("--state-dir", required=True, help="the node's state directory")
    data_args(p)
    p.add_argument("--users", nargs="+", metavar="USER", help="users to (re)fit (default: users of the log without stored factors)")
    p.add_argument("--user-l2", type=float, default=None, help="L2 of the user step (default: as the model was trained)")
    p.add_argument("--negatives", type=int, default=None, help="SGD-trained models: sampled negatives per positive (default: as trained)")
    p.add_argument("--solver-iters", type=int, default=None, help="SGD-trained models: Newton iterations of the user step (default: as trained)")
    p.add_argument("--seed", type=int, default=defaults.seed, help=f"seed of the negative sampling (default {defaults.seed})")
    return parser


def _check_fold_in_args(args: argparse.Namespace) -> None:
    if args.user_l2 is not None and args.user_l2 <= 0:
        raise CliError(f"--user-l2 must be > 0, got {args.user_l2}")
    if args.negatives is not None and args.negatives < 1:
        raise CliError(f"--negatives must be at least 1, got {args.negatives}")
    if args.solver_iters is not None and args.solver_iters < 1:
        raise CliError(f"--solver-iters must be at least 1, got {args.solver_iters}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (the console script passes it to sys.exit)."""
    out, err = sys.stdout, sys.stderr
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2): argparse has printed why
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    try:
        if args.command == "validate":
            return cmd_validate(args, out)
        if args.command == "budget":
            return cmd_budget(args, out)
        if args.command == "recommend":
            return cmd_recommend(args, out, err)
        _check_fold_in_args(args)
        return cmd_fold_in(args, out)
    except CliError as exc:
        print(f"{PROG}: error: {exc}", file=err)
        return EXIT_ERROR
    except OSError as exc:  # e.g. an --output folder that does not exist
        print(f"{PROG}: error: {exc}", file=err)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
