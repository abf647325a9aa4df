"""Scale: one ALS round at 10k to 1M ads and 10 to 100 merchants, private and not (issue 19).

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/scale.py [--ads 10000 100000 1000000] [--merchants 10 50 100]
        [--privacy user none] [--users 1000] [--rows 20] [--factors 32] [--distinct 3] [--repeats 3]

A synthetic catalog of `ads` ads (Zipf popularity, exponent 0.9) and merchants of `users` users with
`rows` interactions each (drawn by popularity; as many impressions as clicks), d = 32. One round,
each role in its own fresh process so its peak RSS is its own:
- client (one merchant): the user step against the global model (shared/als.solve_users, as the
  ALS solver runs it), the ad step's statistics (ad_statistics), under DP the Gaussian noise of
  one release (epsilon 8 over 2 releases, delta 1e-6: client/privacy/private_als.py's
  calibration) and its wire dtype (float16 where the values fit: wire-dtype "auto"), then Flower's serialization of the reply message
  (shared.flower_internals.wire_bytes: every byte the wire carries); `distinct` merchants are
  computed, each with its own users and rows;
- server: the round's replies as Flower's grid hands them to the strategy (every reply a Message
  in memory at once), then ALSAggregation.aggregate_train: the float64 sum and the ad solve.
  Under DP the `distinct` merchants' statistics stand in for the others in turn (a dense
  release's cost depends on the number and size of the replies, not their values); without DP
  every merchant of the cell is its own (the sparse sum holds the union of the ads they touch),
  the ones past `distinct` computed untimed, several in one process.
round_seconds = the slowest distinct client (merchants compute in parallel, each on its own
machine) + its serialization + the server's aggregation; transfer over a network is not
modelled (bytes_per_client is what it would carry). Without DP the statistics are exact per-ad
Gramians of the ads the merchant's rows touch (als-gram "auto" = "sparse": an index and a packed
upper triangle per touched ad, float32), summed over the union of the touched ads.
Every role runs `repeats` times, each in a fresh process; a cell's seconds and peak RSS are the
medians (this machine's timings vary up to 3x run to run).
A cell whose replies would not fit in this machine's memory (merchants x bytes per client over
--memory-gb) is skipped and says so.

Writes benchmarks/results/scale.json: flat records with ads, merchants, factors, privacy, round_seconds,
client_seconds, server_seconds, bytes_per_client, peak_rss_server_mb, peak_rss_client_mb (and
serialize_seconds, note).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a site-packages `benchmarks` shadows this folder
sys.path.insert(0, str(ROOT / "benchmarks"))

RESULTS = ROOT / "benchmarks" / "results" / "scale.json"
EPSILON, DELTA, RELEASES = 8.0, 1e-6, 3  # the popularity release, then two of statistics: the last one is measured
KEYS = ("ads", "merchants", "factors", "privacy", "round_seconds", "client_seconds", "server_seconds", "bytes_per_client",
        "peak_rss_server_mb", "peak_rss_client_mb", "serialize_seconds", "note")


def _config(ads: int, factors: int, privacy: str) -> Any:
    from shared.config import RunConfig

    return RunConfig.from_flower({"privacy": privacy, "factors": factors, "synthetic-ads": ads, "target-epsilon": EPSILON,
                                  "num-rounds": RELEASES, "dp-metrics": "none"})


def _rows(ads: int, users: int, rows: int, seed: int) -> Any:
    """A merchant's (user, ad, label) rows: clicks by Zipf popularity and as many impressions."""
    from shared.als import Rows

    rng = np.random.default_rng([seed, ads])
    weight = 1.0 / np.arange(1, ads + 1) ** 0.9
    weight /= weight.sum()
    n = users * rows
    user = np.repeat(np.arange(users), rows)
    ad = rng.choice(ads, size=n, p=weight)
    label = (rng.random(n) < 0.5).astype(np.float64)
    return Rows(user, ad, label, users)


def _model(ads: int, factors: int) -> dict[str, np.ndarray]:
    from shared.wire import AD_BIAS, AD_FACTORS

    rng = np.random.default_rng(7)
    return {AD_FACTORS: (0.1 * rng.standard_normal((ads, factors))).astype(np.float32), AD_BIAS: np.zeros(ads, dtype=np.float32)}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def run_client(ads: int, factors: int, privacy: str, users: int, rows: int, seed: int, out: Path) -> dict[str, Any]:
    """One merchant's round; its statistics saved to `out` for the server process."""
    from flwr.app import Message, RecordDict

    from client.privacy.plan import noisy_release_wire, wire_dtype
    from shared.accounting import calibrate_noise_multiplier
    from shared.als import ALSSettings, ad_statistics, add_noise, release_budget_shares, solve_users
    from shared.flower_internals import server_identity, wire_bytes
    from shared.wire import AD_BIAS, AD_FACTORS, PrivacyReport, TrainReply

    cfg = _config(ads, factors, privacy)
    settings = ALSSettings.from_config(cfg)
    data, model = _rows(ads, users, rows, seed), _model(ads, factors)
    # the noise multiplier is calibrated once per merchant (its ledger's first release), not per round
    sigma = calibrate_noise_multiplier(EPSILON, DELTA, 1.0, steps=1) / math.sqrt(release_budget_shares(RELEASES, cfg.als_budget_growth)[-1])
    started = time.perf_counter()
    alpha0 = settings.alpha0 if settings.alpha0 is not None else 0.5
    user_factors = solve_users(data, model[AD_FACTORS], model[AD_BIAS], alpha0, settings.user_l2)
    stats = ad_statistics(data, user_factors, ads, settings)
    stats = wire_dtype({key: stats[key] for key in settings.release_keys()})  # under DP the positives are the popularity release's
    report, noisy, stds = None, {}, {}
    if privacy == "user":
        stds = settings.noise_stds(sigma)
        noisy = wire_dtype(add_noise(stats, stds, np.random.default_rng()))
        stats = noisy_release_wire(cfg, noisy)  # as PrivateALS sends it
        report = PrivacyReport(EPSILON, sigma)
    client_seconds = time.perf_counter() - started
    rounding = _rounding_over_noise(noisy, stds) if noisy else {}  # the benchmark's own measurement: not the merchant's time
    started = time.perf_counter()
    with server_identity():
        message = TrainReply(f"merchant-{seed}", stats, None, {}, report).to_message(
            Message(content=RecordDict(), dst_node_id=1, message_type="train"))
        sent = len(wire_bytes(message))
    serialize_seconds = time.perf_counter() - started
    np.savez(out, **stats)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle
    return {"client_seconds": client_seconds, "serialize_seconds": serialize_seconds, "bytes_per_client": sent,
            "peak_rss_client_mb": _peak_rss_mb(), "noise_multiplier": report.noise_multiplier if report else 0.0, **rounding}


def _rounding_over_noise(stats: dict[str, np.ndarray], stds: dict[str, float]) -> dict[str, float]:
    """The rms error of sending the noisy release as float16 or bfloat16 instead of float32, over
    the DP noise std, for the worst statistic: what a more compact wire dtype would add."""
    def bfloat16(x: np.ndarray) -> np.ndarray:  # round to nearest even on the upper 16 bits of float32
        bits = x.astype(np.float32).view(np.uint32)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return rounded.astype(np.uint32).view(np.float32)

    worst = {"float16_error_over_noise": 0.0, "bfloat16_error_over_noise": 0.0}
    for key, value in stats.items():
        for name, cast in (("float16", lambda x: x.astype(np.float16).astype(np.float32)), ("bfloat16", bfloat16)):
            error = float(np.sqrt(np.mean((cast(value).astype(np.float64) - value) ** 2))) / stds[key]
            worst[f"{name}_error_over_noise"] = max(worst[f"{name}_error_over_noise"], error)
    return worst


def run_server(ads: int, factors: int, privacy: str, merchants: int, replies: list[Path], noise_multiplier: float) -> dict[str, Any]:
    from flwr.app import Message, RecordDict

    from server.als_aggregation import ALSAggregation
    from shared.als import ALSSettings
    from shared.flower_internals import server_identity
    from shared.wire import PrivacyReport, TrainReply

    cfg = _config(ads, factors, privacy)
    strategy = ALSAggregation(ALSSettings.from_config(cfg), ads, factors, num_rounds=RELEASES)
    report = PrivacyReport(EPSILON, noise_multiplier) if privacy == "user" else None
    if privacy == "user":  # a statistics round: the popularity release's pooled counts are in memory
        strategy.after_popularity(np.zeros(ads), 1.0, 10.0)
    with server_identity():
        # each reply read when its message is built: only the messages stay in memory, as in a round
        messages = [TrainReply(f"merchant-{i}", dict(np.load(replies[i % len(replies)])), None, {}, report).to_message(
            Message(content=RecordDict(), dst_node_id=1, message_type="train")) for i in range(merchants)]
        started = time.perf_counter()
        aggregated, _ = strategy.aggregate_train(1, messages)
        server_seconds = time.perf_counter() - started
    assert aggregated is not None
    return {"server_seconds": server_seconds, "peak_rss_server_mb": _peak_rss_mb()}


def run_clients(ads: int, factors: int, privacy: str, users: int, rows: int, seeds: list[int], outs: list[str]) -> dict[str, Any]:
    """More merchants' replies (untimed): each seed's run_client, in this one process."""
    for seed, out in zip(seeds, outs, strict=True):
        run_client(ads, factors, privacy, users, rows, seed, Path(out))
    return {"merchants": len(seeds)}


def _median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each numeric field's median over repeated runs of one role (the others as the first run's)."""
    return {key: statistics.median(run[key] for run in runs) if isinstance(value, (int, float)) else value
            for key, value in runs[0].items()}


def _in_process(role: str, **kwargs: Any) -> dict[str, Any]:
    """`role` in a fresh Python process (its own peak RSS), its result as JSON on its last line."""
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); "
            f"import scale; print(json.dumps(scale.run_{role}(**json.loads(sys.argv[1]))))")
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", code, json.dumps(kwargs, default=str)], capture_output=True, text=True,
                          env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"{role} failed: {done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ads", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--merchants", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--privacy", nargs="+", default=["user", "none"], choices=("user", "none"))
    parser.add_argument("--users", type=int, default=1000, help="users per merchant")
    parser.add_argument("--rows", type=int, default=20, help="rows per user (each a click or an impression, even odds)")
    parser.add_argument("--factors", type=int, default=32)
    parser.add_argument("--distinct", type=int, default=3, help="merchants computed (their replies stand in for the rest)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each role per cell (fresh processes): medians reported")
    parser.add_argument("--memory-gb", type=float, default=16.0, help="skip cells whose replies alone would need more")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    print(f"{date.today()} on {platform.node()} ({platform.machine()}), {args.users} users x {args.rows} rows per merchant, "
          f"d = {args.factors}, {args.distinct} distinct merchants per cell, medians of {args.repeats} runs", flush=True)
    print("| " + " | ".join(KEYS) + " |\n|" + "---|" * len(KEYS), flush=True)
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedads-scale-") as scratch:
        for privacy in args.privacy:
            for ads in args.ads:
                paths = [Path(scratch) / f"{privacy}-{ads}-{k}.npz" for k in range(args.distinct)]
                clients = [_median_of([_in_process("client", ads=ads, factors=args.factors, privacy=privacy, users=args.users,
                                                   rows=args.rows, seed=k, out=str(path)) for _ in range(args.repeats)])
                           for k, path in enumerate(paths)]
                slowest = max(clients, key=lambda c: c["client_seconds"])
                if privacy == "none":  # the sparse sum's union grows with the merchants: each one its own
                    more = [Path(scratch) / f"{privacy}-{ads}-{k}.npz" for k in range(args.distinct, max(args.merchants))]
                    if more:
                        _in_process("clients", ads=ads, factors=args.factors, privacy=privacy, users=args.users, rows=args.rows,
                                    seeds=list(range(args.distinct, max(args.merchants))), outs=[str(p) for p in more])
                    paths += more
                if privacy == "user":
                    print(f"({ads} ads: a float16 wire would add {max(c['float16_error_over_noise'] for c in clients):.2e} and bfloat16 "
                          f"{max(c['bfloat16_error_over_noise'] for c in clients):.2e} of the DP noise std, rms, worst statistic)", flush=True)
                for merchants in args.merchants:
                    record: dict[str, Any] = {"ads": ads, "merchants": merchants, "factors": args.factors, "privacy": privacy,
                                              "client_seconds": slowest["client_seconds"], "serialize_seconds": slowest["serialize_seconds"],
                                              "bytes_per_client": slowest["bytes_per_client"],
                                              "peak_rss_client_mb": max(c["peak_rss_client_mb"] for c in clients)}
                    need_gb = merchants * slowest["bytes_per_client"] / 1e9
                    if need_gb > args.memory_gb:
                        record.update(round_seconds=None, server_seconds=None, peak_rss_server_mb=None,
                                      note=f"skipped: {merchants} replies hold {need_gb:.1f} GB at once (over --memory-gb {args.memory_gb:g})")
                    else:
                        server = _median_of([_in_process("server", ads=ads, factors=args.factors, privacy=privacy, merchants=merchants,
                                                         replies=[str(p) for p in paths[:merchants]],
                                                         noise_multiplier=slowest["noise_multiplier"])
                                             for _ in range(args.repeats)])
                        record.update(server, note=None, round_seconds=slowest["client_seconds"] + slowest["serialize_seconds"]
                                      + server["server_seconds"])
                    records.append(record)
                    print("| " + " | ".join("-" if record.get(k) is None else (f"{record[k]:.3f}" if isinstance(record[k], float)
                                                                               else str(record[k])) for k in KEYS) + " |", flush=True)
                for path in paths:
                    path.unlink(missing_ok=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps([{k: r.get(k) for k in KEYS} for r in records], indent=2) + "\n")
    print(f"records: {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
