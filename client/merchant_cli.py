"""fedads-merchant: the merchant's own offline tool, next to its log file and node state.

It runs on the merchant's machine and needs no server: it reads the merchant's interaction log,
the public ad catalog and the node's state directory (the one the ClientApp writes during
training: `global_model.npz`, `user_factors.npz`, `privacy_ledger.json`).

    python -m client.merchant_cli validate --log LOG [--catalog CATALOG] [--lenient]
        Check a log (a table, CSV/Parquet, or user-item pairs: docs/DATA.md) against the schema
        and the catalog (without one: its own ads, as a simulation reads it); print what it holds.
    python -m client.merchant_cli budget --state-dir DIR [--json]
        The privacy spent and left, from the node's persisted accountant.
    python -m client.merchant_cli recommend --state-dir DIR --log LOG --catalog CATALOG
                                            [--users U ...] [--k 10] [--output FILE.csv] [--explain [--because 2]]
        Top-K unseen ads per user: score = p_u . q_a + b_a with the latest global model and the
        locally stored user factors. --explain says why each ad is shown (client/explain.py).
    python -m client.merchant_cli fold-in --state-dir DIR --log LOG --catalog CATALOG [--users U ...]
        Give users of the log who have no stored factors (or the given users) their factors now,
        with the client's exact user step against the current global model, without a round.

Instead of --log, --catalog and --state-dir, every command takes --node-config FILE: the node
config the merchant's SuperNode runs with (data-path, catalog-path, state-dir; shared/node_config.py).
Nothing here talks to the network or changes the privacy ledger; the ranking and fold-in maths
are client/serving.py's, this module parses and prints.
Exit status: 0 on success, 2 on any error, with a one-line `fedads-merchant: error: ...` on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from client.explain import DEFAULT_BECAUSE
from client.merchant_commands import cmd_budget, cmd_fold_in, cmd_recommend, cmd_validate
from client.merchant_files import CliError
from shared.config import ConfigError, RunConfig
from shared.data.log_formats import accepted_formats_text
from shared.node_config import NodeConfig

# torch is imported by fold-in of SGD-trained models only: `--help`, validate, budget and
# recommend answer without paying its seconds of start-up.

PROG = "fedads-merchant"
EXIT_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    defaults = RunConfig()
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="The merchant's offline tool: validate logs, read the privacy budget, serve and fold in users.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def node_config_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--node-config", metavar="FILE",
                       help="the SuperNode's node config (TOML): its data-path, catalog-path and state-dir stand in for the flags below")

    def state_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--state-dir", help="the node's state directory")

    def data_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--log", help="interaction log: a table (CSV or Parquet: user_id, ad_id, timestamp[, event, merchant, region]) "
                                     "or user-item pairs (user item [timestamp] per line)")
        p.add_argument("--catalog", help="ad catalog (CSV or Parquet: ad_id[, category, brand, title])")
        p.add_argument("--lenient", action="store_true", help="drop rows whose ad is not in the catalog instead of failing")

    p = commands.add_parser("validate", help="check a log against the schema and the catalog and summarize it",
                            description="Check a log against the schema and the catalog (without --catalog: against its "
                                        "own ads, as a simulation without catalog-path reads it) and summarize it.",
                            epilog=accepted_formats_text(), formatter_class=argparse.RawDescriptionHelpFormatter)
    node_config_arg(p)
    data_args(p)

    p = commands.add_parser("budget", help="privacy spent and remaining, from the node's ledger")
    node_config_arg(p)
    state_arg(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = commands.add_parser("recommend", help="top-K unseen ads per user from the latest global model")
    node_config_arg(p)
    state_arg(p)
    data_args(p)
    p.add_argument("--users", nargs="+", metavar="USER", help="users to serve (default: every user of the log with stored factors)")
    p.add_argument("--k", type=int, default=10, help="ads per user (default 10)")
    p.add_argument("--output", metavar="FILE.csv", help="write user_id, rank, ad_id, score as CSV instead of printing a table")
    p.add_argument("--exclude", choices=("all", "positives"), default="all",
                   help="ads not to recommend again: any the user has a log row for (all, default), or only clicked/purchased ones")
    p.add_argument("--explain", action="store_true",
                   help="say why each ad is shown (the user's own nearest clicked ads, category and brand, popularity, "
                        "score parts): a line under each row, or extra CSV columns with --output")
    p.add_argument("--because", type=int, default=DEFAULT_BECAUSE, metavar="N",
                   help=f"with --explain: the user's own ads named as reasons, at most (default {DEFAULT_BECAUSE})")

    p = commands.add_parser("fold-in", help="compute factors for new users of the log now, without a training round")
    node_config_arg(p)
    state_arg(p)
    data_args(p)
    p.add_argument("--users", nargs="+", metavar="USER", help="users to (re)fit (default: users of the log without stored factors)")
    p.add_argument("--user-l2", type=float, default=None, help="L2 of the user step (default: as the model was trained)")
    p.add_argument("--negatives", type=int, default=None, help="SGD-trained models: sampled negatives per positive (default: as trained)")
    p.add_argument("--solver-iters", type=int, default=None, help="SGD-trained models: Newton iterations of the user step (default: as trained)")
    p.add_argument("--seed", type=int, default=defaults.seed, help=f"seed of the negative sampling (default {defaults.seed})")
    return parser


# the flags each command needs, those it can do without, and the node-config key that can stand in for each
_NEEDED = {"validate": ("log",), "budget": ("state_dir",), "recommend": ("state_dir", "log", "catalog"),
           "fold-in": ("state_dir", "log", "catalog")}
_OPTIONAL = {"validate": ("catalog",)}
_NODE_KEYS = {"log": "data_path", "catalog": "catalog_path", "state_dir": "state_dir"}


def _resolve_paths(args: argparse.Namespace) -> None:
    """Fill --log, --catalog and --state-dir from --node-config where not given; each command's
    needed ones are then required."""
    node = None
    if args.node_config:
        try:
            node = NodeConfig.load(args.node_config)
        except ConfigError as exc:
            raise CliError(str(exc)) from None
    args.policy = node.pinned_policy() if node is not None else None
    needed = _NEEDED[args.command]
    for flag in needed + _OPTIONAL.get(args.command, ()):
        if getattr(args, flag) is None and node is not None and getattr(node, _NODE_KEYS[flag]):
            setattr(args, flag, getattr(node, _NODE_KEYS[flag]))
        if getattr(args, flag) is None and flag in needed:
            option = "--" + flag.replace("_", "-")
            key = _NODE_KEYS[flag].replace("_", "-")
            raise CliError(f"{args.command}: {option} is required (or --node-config with {key})")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (the console script passes it to sys.exit)."""
    out, err = sys.stdout, sys.stderr
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2): argparse has printed why
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    try:
        _resolve_paths(args)
        if args.command == "validate":
            return cmd_validate(args, out)
        if args.command == "budget":
            return cmd_budget(args, out)
        if args.command == "recommend":
            return cmd_recommend(args, out, err)
        return cmd_fold_in(args, out)
    except CliError as exc:
        print(f"{PROG}: error: {exc}", file=err)
        return EXIT_ERROR
    except OSError as exc:  # e.g. an --output folder that does not exist
        print(f"{PROG}: error: {exc}", file=err)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
