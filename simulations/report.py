"""Plots (PNG) and a static HTML report of an experiment run; no server needed to view it.

The report answers: how much accuracy does federation cost (federated vs centralized vs
local-only), how much does privacy cost (the privacy-utility frontier), and who pays for it
(per-merchant accuracy, small merchants vs large).
"""

from __future__ import annotations

import html
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from shared.als import POPULARITY_MIN_SIGNAL
from shared.privacy_policy import DEFAULT_DELTA
from simulations.audit.figures import AUDIT_DIR, EXPLANATION, HEADERS, RECORDS, audit_records_ok, plot_audit, table_rows
from simulations.experiment import Experiment
from simulations.plotting import plt, save

METRIC = "ndcg10_sampled"
SHOWN = ("hr10_sampled", "ndcg10_sampled", "hr10_full", "ndcg10_full", "recall20_full", "auc_full")


def _aggregate(rows: list[dict[str, Any]], method: str) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for row in rows:
        if row["method"] == method and row["client"] == "aggregate" and row.get(METRIC) is not None:
            series[row["cell"]].append((row["round"], row[METRIC]))
    return {cell: sorted(points) for cell, points in series.items()}


def plot_convergence(rows: list[dict[str, Any]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method, style in (("federated", "-"), ("user-dp-als", "--"), ("user-dp-sgd", "--"), ("client-dp", "-."),
                          ("centralized", ":"), ("local-only", "-")):
        for cell, points in _aggregate(rows, method).items():
            label = f"{method}" if method in ("centralized", "local-only") else cell
            ax.plot(*zip(*points), style, marker="o", markersize=2.5, label=label, alpha=0.85 if method != "local-only" else 0.6)
    for row in rows:
        if row["method"] == "toppop":
            ax.axhline(row[METRIC], color="grey", linewidth=1, label="TopPop")
    ax.set_xlabel("round")
    ax.set_ylabel("NDCG@10 (sampled)")
    ax.set_title("Convergence per round")
    ax.legend(fontsize=7, ncol=2)
    save(fig, path)


def _final(rows: list[dict[str, Any]], method: str, by: str = "cell", clients: bool = False) -> list[dict[str, Any]]:
    """The last round's row of `method` for each cell (aggregate rows) or each client."""
    last: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["method"] != method or (row["client"] == "aggregate") == clients or row.get(METRIC) is None:
            continue
        if row[by] not in last or row["round"] > last[row[by]]["round"]:
            last[row[by]] = row
    return list(last.values())


def plot_frontier(rows: list[dict[str, Any]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    epsilons: set[float] = set()
    for method, label in (("user-dp-als", "private ALS (user-level DP)"), ("user-dp-sgd", "DP-SGD (user-level DP)"),
                          ("dp-popularity", "DP popularity (noisy counts)")):
        private = sorted((r["epsilon_target"], r[METRIC]) for r in _final(rows, method, by="epsilon_target"))
        if private:
            ax.plot(*zip(*private), "o-" if method != "dp-popularity" else "s:", label=label)
            epsilons |= {e for e, _ in private}
    if epsilons:
        ax.set_xscale("log")
        ax.set_xticks(sorted(epsilons), [f"{e:g}" for e in sorted(epsilons)])
        ax.minorticks_off()
    for method, colour in (("federated", "tab:green"), ("centralized", "tab:purple"), ("toppop", "grey")):
        for row in _final(rows, method)[:1]:
            ax.axhline(row[METRIC], color=colour, linestyle="--", label=f"{method} (no DP)" if method != "toppop" else "TopPop")
    ax.set_xlabel("target epsilon per merchant (log scale)")
    ax.set_ylabel("NDCG@10 (sampled), final round")
    ax.set_title("Privacy-utility frontier")
    ax.legend(fontsize=8, loc="best", framealpha=0.9)
    save(fig, path)


def plot_per_merchant(rows: list[dict[str, Any]], path: Path) -> None:
    """Final-round NDCG per merchant: federated (no DP) vs alone, merchants ordered by size."""
    def final_per_client(method: str) -> dict[str, tuple[float, float]]:
        return {r["client"]: (r.get("test_users") or 0.0, r[METRIC]) for r in _final(rows, method, by="client", clients=True)}

    federated, alone = final_per_client("federated"), final_per_client("local-only")
    names = sorted(set(federated) | set(alone), key=lambda c: (federated.get(c) or alone.get(c) or (0, 0))[0])
    fig, ax = plt.subplots(figsize=(7, 4.2))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [alone.get(n, (0, 0))[1] for n in names], width=0.4, label="local-only")
    ax.bar([x + 0.2 for x in xs], [federated.get(n, (0, 0))[1] for n in names], width=0.4, label="federated")
    sizes = [int((federated.get(n) or alone.get(n) or (0, 0))[0]) for n in names]
    ax.set_xticks(list(xs), [f"{n}\n{s} test users" for n, s in zip(names, sizes)], fontsize=7)
    ax.set_ylabel("NDCG@10 (sampled), final round")
    ax.set_title("Who gains from federation (merchants ordered by size)")
    ax.legend(fontsize=8)
    save(fig, path)


def plot_epsilon(rows: list[dict[str, Any]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for row in rows:
        if row["client"] == "aggregate" and row.get("epsilon_spent") is not None and row["method"] in ("user-dp-als", "user-dp-sgd", "client-dp"):
            series[row["cell"]].append((row["round"], row["epsilon_spent"]))
    for cell, points in sorted(series.items()):
        ax.plot(*zip(*sorted(points)), "o-", markersize=3, label=cell)
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon spent (max over merchants)")
    ax.set_title("Privacy budget spent per round")
    if series:
        ax.legend(fontsize=7)
    save(fig, path)


def _guarantee(cell: dict[str, Any]) -> str:
    cfg = cell["run_config"]
    if cfg["privacy"] == "user":
        delta = f"{cfg['target-delta'] or DEFAULT_DELTA:g}"
        covered = {"noised": "model and noised metrics", "none": "model (no metrics released; the harness's exact evaluation is outside it)"}[
            cfg["dp-metrics"]]
        return (f"user-level ({cfg['target-epsilon']:g}, {delta})-DP per merchant for its {covered}; "
                "Opacus RDP accountant; protects each end user against the server, other merchants and model viewers")
    if cfg["privacy"] == "client":
        return (f"client-level DP (target epsilon {cfg['target-epsilon']:g}) by Flower's server-side clipping and noise; "
                "trusted server; protects a merchant's participation against model viewers")
    return "none: exact ad parameters and metrics leave the merchants (no user id or user factor does)"


def _model(cell: dict[str, Any]) -> str:
    """Private ALS: the model its popularity rule chose, and why (server/als_aggregation.py)."""
    signal = cell.get("popularity_signal")
    if signal is None:
        return "-"
    if cell.get("ranks_by_popularity") and signal < POPULARITY_MIN_SIGNAL:
        return f"noisy popularity (signal {signal:.1f} < {POPULARITY_MIN_SIGNAL:g}: a personal model would rank worse)"
    if cell.get("ranks_by_popularity"):
        return "noisy popularity (a run of one round releases popularity only)"
    return f"personal (signal {signal:.1f})"


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return text == "-"


def _figure(name: str, title: str) -> str:
    return f'<figure><img src="plots/{name}" alt="{html.escape(title)}"><figcaption>{html.escape(title)}</figcaption></figure>'


def _table(headers: list[str], body: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    rows = "".join(
        "<tr>" + "".join(f'<td class="{"num" if _is_number(str(c)) else "text"}">{html.escape(str(c))}</td>' for c in r) + "</tr>"
        for r in body
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _audit_section(output: Path, plots: Path) -> str:
    """The privacy audit's table and figure when the run folder holds an audit
    (`python -m simulations.audit`, simulations/audit/); nothing otherwise."""
    path = output / AUDIT_DIR / RECORDS
    try:
        records = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        records = None
    if not audit_records_ok(records):
        return ""
    plot_audit(records, plots / "audit.png")
    return (f"<h2>Privacy audit</h2>\n<p>{html.escape(EXPLANATION)} Records: <a href=\"{AUDIT_DIR}/{RECORDS}\">{RECORDS}</a>.</p>\n"
            f"{_table(HEADERS, table_rows(records))}\n{_figure('audit.png', 'Claimed epsilon vs empirical lower bound')}\n")


def _delivery_section(output: Path) -> str:
    """The delivery loop's tables and figures when the run folder holds one (an experiment file
    with a [delivery] table, simulations/delivery/); nothing otherwise."""
    folder = output / "delivery"
    try:
        records = json.loads((folder / "delivery.json").read_text()) if (folder / "delivery.json").is_file() else None
    except (OSError, ValueError):
        records = None
    if not isinstance(records, list):
        return ""
    from simulations.delivery.report import FIGURES, POLICY_COLUMNS, UPLIFT_COLUMNS, format_cell

    own = [r for r in records if r.get("uplift_vs") is None]
    uplift = [r for r in records if r.get("uplift_vs") is not None and r.get("merchant") is None]
    figures = "".join(
        f'<figure><img src="delivery/plots/{name}" alt="{html.escape(title)}"><figcaption>{html.escape(title)}</figcaption></figure>'
        for name, title in FIGURES.items() if (folder / "plots" / name).is_file())
    return (f"<h2>Delivery loop</h2>\n<p>Simulated delivery on the synthetic market: <a href=\"delivery/report.html\">its report</a>.</p>\n"
            f"{_table(list(POLICY_COLUMNS), [[format_cell(r.get(k)) for k in POLICY_COLUMNS] for r in own])}\n"
            f"{_table(list(UPLIFT_COLUMNS), [[format_cell(r.get(k)) for k in UPLIFT_COLUMNS] for r in uplift])}\n"
            f'<div class="figs">{figures}</div>\n')


def write_report(experiment: Experiment, output: Path, rows: list[dict[str, Any]], summary: dict[str, Any]) -> Path:
    plots = output / "plots"
    plots.mkdir(exist_ok=True)
    figures = {
        "convergence.png": ("Convergence per round", plot_convergence),
        "frontier.png": ("Privacy-utility frontier", plot_frontier),
        "per_merchant.png": ("Per-merchant accuracy: local-only vs federated", plot_per_merchant),
        "epsilon.png": ("Epsilon spent per round", plot_epsilon),
    }
    for name, (_, plot) in figures.items():
        plot(rows, plots / name)

    def fmt(value: Any) -> str:
        return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)

    final_rows = []
    for method in ("toppop", "centralized", "local-only", "federated", "client-dp", "dp-popularity", "user-dp-sgd", "user-dp-als"):
        by = "epsilon_target" if method == "dp-popularity" else "cell"
        for row in sorted(_final(rows, method, by=by), key=lambda r: (r.get("epsilon_target") or 0, r["cell"])):
            final_rows.append([method, row["cell"], fmt(row.get("epsilon_target")), fmt(row["round"])]
                              + [fmt(row.get(m)) for m in SHOWN] + [fmt(row.get("epsilon_spent"))])
    cells = [[c["cell"], str(c["clients"]), str(c["seed"]), _guarantee(c), _model(c), fmt(c.get("epsilon_spent")),
              str(c.get("refused", 0)), f"{c['wall_seconds']:.0f}"] for c in summary["cells"]]
    environment = json.loads((output / "environment.json").read_text()) if (output / "environment.json").is_file() else {}
    base = experiment.base
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fedads: {html.escape(experiment.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5rem 0 1.5rem; font-size: 0.85rem; }}
th, td {{ border: 1px solid #ccc; padding: 0.25rem 0.5rem; }}
th {{ background: #f3f3f3; }} td.num {{ text-align: right; }} td.text {{ text-align: left; }}
img {{ max-width: 100%; border: 1px solid #eee; }} .figs {{ display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; }}
</style></head><body>
<h1>fedads experiment: {html.escape(experiment.name)}</h1>
<p>Data: {html.escape(base.dataset)}; partition: {html.escape(base.partitioning)};
{base.num_rounds} rounds x {base.local_epochs} local epoch(s); biased MF, {base.factors} factors.
Metrics: leave-last-out; sampled = 99 fixed negatives per user, full = every ad without a training positive.</p>
<h2>Final round, every method</h2>
{_table(["method", "cell", "target eps", "round", *SHOWN, "eps spent"], final_rows)}
<h2>Figures</h2>
<div class="figs">{"".join(_figure(name, title) for name, (title, _) in figures.items())}</div>
{_audit_section(output, plots)}{_delivery_section(output)}<h2>Runs and their guarantees</h2>
{_table(["cell", "clients", "seed", "privacy guarantee", "model", "eps spent (max)", "refused replies", "wall s"], cells)}
<p>Full results: <a href="results.csv">results.csv</a>, <a href="results.json">results.json</a>;
experiment: <a href="experiment.toml">experiment.toml</a>; environment: {html.escape(json.dumps(environment.get("packages", {})))}.</p>
</body></html>
"""
    path = output / "report.html"
    path.write_text(page)
    return path
