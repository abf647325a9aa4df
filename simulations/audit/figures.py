"""The audit's figure (claimed epsilon vs empirical lower bound, per solver) and its tables
(Markdown for docs, rows for the HTML report); shared by the audit command and
simulations/report.py."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeGuard

from simulations.plotting import plt, save

AUDIT_DIR = "audit"  # an audit's default folder inside its experiment's sweep run folder
RECORDS = "audit.json"
SOLVER_NAMES = {"als": "ALS", "sgd": "SGD"}
DP_NAMES = {"als": "private ALS", "sgd": "DP-SGD"}  # the solvers under user-level DP
MARKERS = ("o", "^", "s", "D")
HEADERS = ["solver", "dataset", "DP", "claimed epsilon", "delta", "canaries", "guesses", "correct", "epsilon lower bound (95%)",
           "most m canaries can show"]


def _name(solver: str) -> str:
    return SOLVER_NAMES.get(solver, solver)


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if value == 0 or abs(value) >= 0.01 else f"{value:.1e}"
    return str(value)


def table_rows(records: Sequence[dict[str, Any]]) -> list[list[str]]:
    """One row per run, DP-off runs first within each solver, then by claimed epsilon."""
    ordered = sorted(records, key=lambda r: (r["solver"], r["dp"], r["epsilon"] or 0.0))
    return [[_name(r["solver"]), r["dataset"], _fmt(r["dp"]), _fmt(r["epsilon"], 0) if r["dp"] else "- (no DP)",
             "-" if r.get("delta") is None else f"{r['delta']:.2g}",
             str(r["canaries"]), _fmt(r.get("guesses")), _fmt(r.get("correct")), _fmt(r["epsilon_lower_bound"]),
             _fmt(r.get("epsilon_lower_bound_max"))] for r in ordered]


def markdown_table(records: Sequence[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(records)]
    return "\n".join(lines)


def plot_audit(records: Sequence[dict[str, Any]], path: Path) -> None:
    """Lower bound against the claim, one series per solver; the runs without DP at the right
    edge ("no DP"); the line y = x (a bound above it would refute the claim) and the most the
    canaries can show (every guess right). Solvers sit slightly apart, so that equal bounds stay visible."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    claims = sorted({float(r["epsilon"]) for r in records if r["dp"]})
    top = max(claims, default=1.0)
    no_dp_x = top * 1.5 if claims else 1.0
    solvers = sorted({r["solver"] for r in records})
    for n, solver in enumerate(solvers):
        shift = (n - (len(solvers) - 1) / 2) * 0.02 * no_dp_x
        marker = MARKERS[n % len(MARKERS)]
        mine = [r for r in records if r["solver"] == solver]
        private = sorted((float(r["epsilon"]) + shift, r["epsilon_lower_bound"]) for r in mine if r["dp"])
        colour = f"C{n}"
        if private:
            ax.plot(*zip(*private), marker + "-", color=colour, label=DP_NAMES.get(solver, solver))
        free = [r["epsilon_lower_bound"] for r in mine if not r["dp"]]
        if free:
            ax.plot([no_dp_x + shift] * len(free), free, marker, color=colour, markersize=9, markerfacecolor="none",
                    label=f"{_name(solver)} without DP")
    if claims:
        ax.plot([0, top], [0, top], ":", color="grey", label="bound = claim")
    largest = max((r.get("epsilon_lower_bound_max") or 0.0 for r in records), default=0.0)
    if largest:
        ax.axhline(largest, color="tab:red", linestyle="--", linewidth=1, label=f"most {records[0]['canaries']} canaries can show")
    ax.set_xticks([*claims, no_dp_x], [f"{c:g}" for c in claims] + ["no DP"])
    ax.set_xlim(0, no_dp_x * 1.1)
    ax.set_ylim(0, max(top, largest, *(r["epsilon_lower_bound"] for r in records), 1.0) * 1.1)
    ax.set_xlabel("claimed epsilon per merchant")
    ax.set_ylabel("empirical epsilon lower bound (95%)")
    ax.set_title("One-run privacy audit (Steinke, Nasr and Jagielski 2023)")
    ax.legend(fontsize=8, loc="upper left", framealpha=0.9)
    save(fig, path)


def audit_records_ok(records: Any) -> TypeGuard[list[dict[str, Any]]]:
    """Whether a loaded audit.json holds what the figure and the tables read."""
    keys = {"solver", "dataset", "dp", "epsilon", "canaries", "epsilon_lower_bound"}
    return isinstance(records, list) and bool(records) and all(
        isinstance(r, dict) and keys <= set(r) and not (r["dp"] and r["epsilon"] is None) and math.isfinite(r["epsilon_lower_bound"])
        for r in records)


def html_table(records: Sequence[dict[str, Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in HEADERS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in table_rows(records))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


EXPLANATION = (
    "One-run privacy audit (Steinke, Nasr and Jagielski, NeurIPS 2023): m canary users, each with its own new ad in the "
    "public catalog, each in the training data with probability 1/2; the score of a canary is its ad's bias in the released "
    "global model; guesses \"in\" for the highest scores and \"out\" for the lowest give an empirical lower bound on epsilon at "
    "95% confidence. A bound above the claimed epsilon would refute the claim; without DP the canaries should be found "
    "(a bound near the most m canaries can show)."
)


def audit_page(name: str, records: Sequence[dict[str, Any]], figure: str) -> str:
    """A standalone page of the audit: the table and the figure."""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fedads privacy audit: {html.escape(name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5rem 0 1.5rem; font-size: 0.85rem; }}
th, td {{ border: 1px solid #ccc; padding: 0.25rem 0.5rem; }} th {{ background: #f3f3f3; }}
img {{ max-width: 100%; border: 1px solid #eee; }}
</style></head><body>
<h1>Privacy audit: {html.escape(name)}</h1>
<p>{html.escape(EXPLANATION)}</p>
{html_table(records)}
<figure><img src="{html.escape(figure)}" alt="claimed epsilon vs empirical lower bound"></figure>
<p>Records: <a href="audit.json">audit.json</a>; canaries: <a href="canaries.json">canaries.json</a>.</p>
</body></html>
"""
