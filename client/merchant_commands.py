"""The merchant agent's commands: each reads its inputs (client/merchant_files.py), calls the
project's code (the log's summary, the ledger's, client/serving.py) and prints the result."""

from __future__ import annotations

import argparse
import csv
import json
import re
from datetime import UTC, datetime
from typing import Any, TextIO

import numpy as np

from client.explain import Explanation, explain
from client.merchant_files import (
    CliError,
    load_budget,
    load_catalog,
    load_content_blend,
    load_global_model,
    load_log,
    load_log_alone,
    load_stored_factors,
    load_user_step,
    open_state,
)
from client.serving import Recommendation, fold_in, recommend, seen_ads
from shared.data.log_formats import detect_log_format
from shared.data.schema import AdCatalog, Event, InteractionLog
from shared.params import user_dim

EXIT_OK = 0
# Integer timestamps at or past this are shown as UTC dates too; smaller ones are more likely a
# position or another monotone clock (the Amazon loader uses sequence positions).
EPOCH_SECONDS_FROM = 10**8  # 1973-03-03


# ====================================================================== validate
def _format_time(value: int | None) -> str:
    if value is None:
        return "-"
    if value >= EPOCH_SECONDS_FROM:
        return f"{value} ({datetime.fromtimestamp(value, tz=UTC).strftime('%Y-%m-%dT%H:%M:%SZ')})"
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
    if args.catalog is None:  # the log alone: its own ads are its catalog, as a simulation without catalog-path reads it
        catalog, log = load_log_alone(args.log)
        against = "its own ads (no catalog given)"
    else:
        catalog = load_catalog(args.catalog)
        log = load_log(args.log, catalog, strict=not args.lenient)
        against = args.catalog
    s = log.summary()
    print(f"{args.log}: valid ({'lenient' if args.lenient else 'strict'}) against {against}", file=out)
    fields: list[tuple[str, object]] = [
        ("format", detect_log_format(args.log).describe()),
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
    notices = [*catalog.warnings, *log.warnings]
    print(f"  {'notices:':<12}{len(notices)}" + (" (accepted, but worth a look)" if notices else ""), file=out)
    for notice in notices:
        print(f"    {notice}", file=out)
    return EXIT_OK


# ====================================================================== budget
def _show(value: Any, fmt: str = "") -> str:
    return "-" if value is None else format(value, fmt)


def cmd_budget(args: argparse.Namespace, out: TextIO) -> int:
    report = load_budget(args.state_dir)
    report["policy"] = args.policy.describe() if args.policy is not None else None
    if args.json:
        json.dump(report, out, indent=2)
        print(file=out)
        return EXIT_OK
    r = report
    print(f"privacy budget of {r['state_dir']} ({r['accountant']} accountant)", file=out)
    if not r["dp_guarantee"]:
        without_dp = r["non_private_releases"] + r["exact_metric_releases"]
        print(f"  NO DP GUARANTEE: {without_dp} release(s) were made without differential privacy", file=out)
    print(f"  epsilon spent:         {_show(r['epsilon_spent'], '.6g') if r['dp_guarantee'] else 'inf'}", file=out)
    print(f"  epsilon remaining:     {_show(r['epsilon_remaining'], '.6g')}", file=out)
    print(f"  target epsilon:        {_show(r['target_epsilon'], 'g')}", file=out)
    print(f"  delta:                 {_show(r['delta'], '.3g')}", file=out)
    print(f"  rounds trained:        {r['rounds_trained']}", file=out)
    print(f"  noise multiplier:      {_show(r['noise_multiplier'], '.6g')}", file=out)
    print(f"  releases:              {r['releases']} Gaussian ({r['accountant_entries']} accountant entries)", file=out)
    print(f"  non-private releases:  {r['non_private_releases']}", file=out)
    print(f"  exact metric releases: {r['exact_metric_releases']}", file=out)
    policy = r["policy"]
    if policy is None:
        print("  policy:                (give --node-config to show the merchant's policy)", file=out)
    else:
        mode = "user-level DP required" if policy["mode"] == "user" else "none (no DP claim)"
        print(f"  policy:                {mode}; epsilon at most {policy['max_epsilon']:g}, delta {policy['delta']:.3g} "
              f"(at most {policy['max_users']} users), metrics {policy['metrics']}, solvers {', '.join(policy['solvers'])}", file=out)
    return EXIT_OK


# ====================================================================== recommend
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


CSV_COLUMNS = ["user_id", "rank", "ad_id", "score"]
# --explain's columns after those: the reasons a program can use, and the line a person reads
EXPLAIN_COLUMNS = ["bias", "match", "because_ads", "category_matches", "brand_matches", "popularity_percentile", "content_affinity", "why"]


def _write_csv(path: str, recommendations: list[Recommendation], explanations: list[Explanation] | None = None) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS + (EXPLAIN_COLUMNS if explanations is not None else []))
        for i, r in enumerate(recommendations):
            row: list[object] = [r.user_id, r.rank, r.ad_id, format(r.score, ".9g")]
            if explanations is not None:
                e = explanations[i]
                row += [format(e.bias, ".9g"), format(e.match, ".9g"), ";".join(b.ad_id for b in e.because),
                        e.category_matches, e.brand_matches, format(e.popularity_percentile, ".4g"), format(e.affinity, ".9g"), e.text]
            writer.writerow(row)


def _print_table(recommendations: list[Recommendation], catalog: AdCatalog, out: TextIO,
                 explanations: list[Explanation] | None = None) -> None:
    width = max([len("user_id"), *(len(r.user_id) for r in recommendations)])
    ad_width = max([len("ad_id"), *(len(r.ad_id) for r in recommendations)])
    print(f"{'user_id':<{width}}  {'rank':>4}  {'ad_id':<{ad_width}}  {'score':>10}  category", file=out)
    for i, r in enumerate(recommendations):
        category = catalog.categories[catalog.index[r.ad_id]]
        print(f"{r.user_id:<{width}}  {r.rank:>4}  {r.ad_id:<{ad_width}}  {r.score:>10.4f}  {category}", file=out)
        if explanations is not None:
            # a line of its own: the sentence is too long for a column, and the table's columns stay as they are
            print(f"{'':<{width}}  {'':>4}  why: {explanations[i].text}", file=out)


def cmd_recommend(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if args.k < 1:
        raise CliError(f"--k must be at least 1, got {args.k}")
    if args.explain and args.because < 0:
        raise CliError(f"--because must be at least 0, got {args.because}")
    catalog = load_catalog(args.catalog)
    log = load_log(args.log, catalog, strict=not args.lenient)
    state = open_state(args.state_dir)
    arrays, server_round = load_global_model(state, catalog)
    factors = load_stored_factors(state, user_dim(arrays))
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
    blend = load_content_blend(state)  # as the run's evaluation ranked (recorded with the model)
    recommendations = recommend(users, factors, arrays, catalog, seen_ads(log, args.exclude == "positives"), args.k, blend, log)
    explanations = explain(recommendations, factors, arrays, catalog, log, args.because) if args.explain else None
    if args.output:
        _write_csv(args.output, recommendations, explanations)
        print(f"wrote {len(recommendations)} recommendations for {len(users)} user(s) to {args.output} "
              f"(global model of round {server_round})", file=out)
    else:
        _print_table(recommendations, catalog, out, explanations)
    return EXIT_OK


# ====================================================================== fold-in
def cmd_fold_in(args: argparse.Namespace, out: TextIO) -> int:
    state = open_state(args.state_dir)
    step = load_user_step(state, args)  # the flags' values are checked before any file is read
    catalog = load_catalog(args.catalog)
    log = load_log(args.log, catalog, strict=not args.lenient)
    arrays, server_round = load_global_model(state, catalog)
    dim = user_dim(arrays)
    stored = load_stored_factors(state, dim)
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
    folded = fold_in(log, arrays, users, step, args.seed)
    merged = {**stored, **folded}
    ids = np.array(list(merged), dtype=str)
    state.save_user_factors(ids, np.stack([merged[u] for u in ids.tolist()]).astype(np.float32))
    print(f"folded in {len(folded)} user(s) against the global model of round {server_round} "
          f"({dim} factors); {len(merged)} user(s) stored in {state.user_factors_path}", file=out)
    return EXIT_OK
