"""The delivery run's figures and its static HTML page.

CTR over rounds per policy; uplift of federated over every other policy with 95% intervals;
per-merchant uplift over local-only beside each merchant's number of users; the exposure curve
(Lorenz curve of impressions over the catalog's ads) per policy.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np

from simulations.delivery.fairness import lorenz_curve
from simulations.plotting import plt, save


def _label(epsilon: float | None) -> str:
    return "no DP" if epsilon is None else f"epsilon {epsilon:g}"


def plot_ctr_over_rounds(rounds: list[dict[str, Any]], path: Path) -> None:
    rounds = [r for r in rounds if r["merchant"] is None]
    fig, ax = plt.subplots(figsize=(7, 4))
    for epsilon in sorted({r["epsilon"] for r in rounds}, key=lambda e: (e is not None, e or 0)):
        for policy in dict.fromkeys(r["policy"] for r in rounds):
            points = [(r["round"], r["ctr"]) for r in rounds if r["policy"] == policy and r["epsilon"] == epsilon and r["ctr"] is not None]
            if points and (policy == "federated" or epsilon == rounds[0]["epsilon"]):  # the controls do not depend on epsilon
                style = "-" if epsilon is None or policy != "federated" else "--"
                ax.plot(*zip(*points), style, marker="o", markersize=3,
                        label=policy if policy != "federated" else f"federated ({_label(epsilon)})")
    ax.set_xlabel("round")
    ax.set_ylabel("CTR")
    ax.set_title("CTR per round, by policy")
    ax.legend(fontsize=8)
    save(fig, path)


def plot_uplift(uplifts: list[dict[str, Any]], path: Path) -> None:
    rows = [r for r in uplifts if r["merchant"] is None]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.5))
    labels = [f"{r['metric'].upper()} vs {r['uplift_vs']} ({_label(r['epsilon'])})" for r in rows]
    y = np.arange(len(rows))
    centre = np.array([r["uplift"] for r in rows]) * 100
    low = centre - np.array([r["ci_low"] for r in rows]) * 100
    high = np.array([r["ci_high"] for r in rows]) * 100 - centre
    ax.errorbar(centre, y, xerr=[np.nan_to_num(low, posinf=0), np.nan_to_num(high, posinf=0)], fmt="o", capsize=3)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlabel("uplift of federated, % (95% interval)")
    ax.set_title("A/B uplift of the federated policy")
    save(fig, path)


def plot_per_merchant(uplifts: list[dict[str, Any]], path: Path) -> None:
    rows = [r for r in uplifts if r["merchant"] is not None and r["metric"] == "ctr"]
    fig, ax = plt.subplots(figsize=(7, 4))
    epsilons = sorted({r["epsilon"] for r in rows}, key=lambda e: (e is not None, e or 0))
    merchants = sorted({r["merchant"] for r in rows})
    width = 0.8 / max(len(epsilons), 1)
    for k, epsilon in enumerate(epsilons):
        mine = {r["merchant"]: r for r in rows if r["epsilon"] == epsilon}
        x = np.arange(len(merchants)) + k * width
        centre = np.array([mine[m]["uplift"] * 100 if m in mine else np.nan for m in merchants])
        err = np.array([[centre[i] - mine[m]["ci_low"] * 100, mine[m]["ci_high"] * 100 - centre[i]] if m in mine else [0, 0]
                        for i, m in enumerate(merchants)]).T
        ax.bar(x, centre, width, yerr=np.nan_to_num(err, posinf=0), capsize=3, label=_label(epsilon))
    users = {r["merchant"]: r["users"] for r in rows}
    ax.set_xticks(np.arange(len(merchants)) + 0.4 - width / 2, [f"{m}\n({users[m]} users)" for m in merchants], fontsize=8)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_ylabel("CTR uplift over local-only, %")
    ax.set_title("Per-merchant gain from federation")
    ax.legend(fontsize=8)
    save(fig, path)


def plot_exposure(curves: dict[str, np.ndarray], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 5))
    for policy, impressions in curves.items():
        x, y = lorenz_curve(impressions)
        ax.plot(x, y, label=policy)
    ax.plot([0, 1], [0, 1], ":", color="grey", label="equal exposure")
    ax.set_xlabel("share of ads (least shown first)")
    ax.set_ylabel("share of impressions")
    ax.set_title("Exposure curve")
    ax.legend(fontsize=8)
    save(fig, path)


FIGURES = {
    "ctr_rounds.png": "CTR per round, by policy",
    "uplift.png": "A/B uplift of federated over each policy (95% intervals)",
    "per_merchant.png": "Per-merchant CTR uplift over local-only",
    "exposure.png": "Exposure curve (Lorenz) per policy",
}


POLICY_COLUMNS = ("policy", "epsilon", "users", "ctr", "cvr", "rpm", "exposure_gini", "advertiser_gini", "ad_coverage",
                  "small_advertiser_coverage")
UPLIFT_COLUMNS = ("epsilon", "merchant", "users", "uplift_vs", "metric", "uplift", "ci_low", "ci_high", "p_value")


def format_cell(value: Any) -> str:
    """A table cell: floats to 4 places, None as a dash."""
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _table(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> str:
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(format_cell(r.get(k)))}</td>" for k in keys) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(output: Path, name: str, summary: str, policies: list[dict[str, Any]], uplifts: list[dict[str, Any]],
                 rounds: list[dict[str, Any]], curves: dict[str, np.ndarray]) -> Path:
    plots = output / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    plot_ctr_over_rounds(rounds, plots / "ctr_rounds.png")
    plot_uplift(uplifts, plots / "uplift.png")
    plot_per_merchant(uplifts, plots / "per_merchant.png")
    plot_exposure(curves, plots / "exposure.png")
    figures = "".join(f'<figure><img src="plots/{f}" alt="{html.escape(t)}"><figcaption>{html.escape(t)}</figcaption></figure>'
                      for f, t in FIGURES.items())
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fedads delivery: {html.escape(name)}</title>
<style>body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5rem 0 1.5rem; font-size: 0.85rem; }} th, td {{ border: 1px solid #ccc; padding: 0.25rem 0.5rem; }}
th {{ background: #f3f3f3; }} img {{ max-width: 100%; }} .figs {{ display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; }}</style>
</head><body>
<h1>fedads delivery loop: {html.escape(name)}</h1>
<p>{html.escape(summary)}</p>
<h2>Policies</h2>
{_table(policies, POLICY_COLUMNS)}
<h2>A/B uplift of federated</h2>
{_table(uplifts, UPLIFT_COLUMNS)}
<h2>Figures</h2><div class="figs">{figures}</div>
<p>Records: <a href="delivery.json">delivery.json</a>, <a href="rounds.json">rounds.json</a>.</p>
</body></html>
"""
    path = output / "report.html"
    path.write_text(page)
    return path
