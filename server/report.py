"""The per-round metrics table the server prints (and the harness's main job, with the same rows)."""

from __future__ import annotations

from typing import Any

from shared.wire import MERCHANT_POP_PREFIX, POPULARITY_SIGNAL, TRAIN_LOSS

Column = tuple[str, str, str]  # key of the round's flattened record, title, format

COLUMNS: tuple[Column, ...] = (
    ("round", "round", "{:>5}"),
    ("hr10_sampled", "HR@10s", "{:>7.4f}"),
    ("ndcg10_sampled", "NDCG@10s", "{:>8.4f}"),
    ("hr10_full", "HR@10f", "{:>7.4f}"),
    ("ndcg10_full", "NDCG@10f", "{:>8.4f}"),
    ("recall20_full", "R@20f", "{:>7.4f}"),
    ("auc_full", "AUC", "{:>7.4f}"),
    # each merchant ranking by its own shard's popularity (the global TopPop is a sweep baseline)
    (MERCHANT_POP_PREFIX + "ndcg10_sampled", "merchant-pop NDCG@10s", "{:>21.4f}"),
    (TRAIN_LOSS, "loss", "{:>7.4f}"),
    # private ALS: its popularity rule's signal (under 7: the model ranks by noisy popularity)
    (POPULARITY_SIGNAL, "pop signal", "{:>10.1f}"),
    ("epsilon_max", "eps max", "{:>7.3f}"),
    ("round_seconds", "sec", "{:>6.1f}"),
)


def _width(title: str, fmt: str) -> int:
    return max(len(title), len(fmt.format(0.0 if "f" in fmt else 0)))


def header(columns: tuple[Column, ...] = COLUMNS) -> str:
    return " | ".join(f"{title:>{_width(title, fmt)}}" for _, title, fmt in columns)


def row(record: dict[str, Any], columns: tuple[Column, ...] = COLUMNS) -> str:
    flat = {"round": record["round"], "round_seconds": record.get("round_seconds") or 0.0,
            **record.get("train", {}), **record.get("evaluate", {}), **record.get("privacy", {})}
    cells = []
    for key, title, fmt in columns:
        value = flat.get(key)
        width = _width(title, fmt)
        cells.append(f"{'-':>{width}}" if value is None else f"{fmt.format(value):>{width}}")
    return " | ".join(cells)


def table(history: list[dict[str, Any]], columns: tuple[Column, ...] = COLUMNS) -> str:
    top = header(columns)
    return "\n".join([top, "-" * len(top)] + [row(r, columns) for r in history])
