"""Check a data file row by row: ``python -m ptuning.data FILE [--prompt-column ...]``.

Prints the number of good rows, or ``error: <file>, line <n>: <problem>`` and exits with status 2.
"""

from __future__ import annotations

import argparse
import logging

from .config import DataConfig
from .loading import exit_on_data_error, read_rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m ptuning.data", description="Check a P-Tuning data file row by row."
    )
    parser.add_argument("file", help=".json / .jsonl / .csv file")
    parser.add_argument("--prompt-column", default="content")
    parser.add_argument("--response-column", default="summary")
    parser.add_argument("--history-column", default=None)
    parser.add_argument("--skip-bad-rows", action="store_true", help="count bad rows instead of stopping")
    args = parser.parse_args(argv)
    cfg = DataConfig(
        prompt_column=args.prompt_column,
        response_column=args.response_column,
        history_column=args.history_column,
        skip_bad_rows=args.skip_bad_rows,
    )
    logging.basicConfig(format="%(levelname)s: %(message)s")
    with exit_on_data_error():
        report = read_rows(args.file, cfg)
    print(f"{args.file}: {len(report.rows)} rows ok, {report.skipped} skipped")


if __name__ == "__main__":
    main()
