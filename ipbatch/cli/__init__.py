"""The `ipbatch` command. Exit codes: 0 all good; 1 some items failed (`verify`: some outputs
missing or broken); 2 usage or configuration error (a setting, a file, credentials a service
refused; `ipbatch worker` too, at start or later); 3 a service (the database, the broker, S3)
could not be reached.

One module per command group, each with its parsers next to its commands: `jobs` (run,
submit, status, cancel, retry, verify, report), `training` (train, eval), `services` (worker,
producer, reaper) and `admin` (db, models, manifest). A command parses, calls the workers
layer and prints; what changes the ledger is there, never here.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from pydantic import ValidationError
from pydantic_settings import SettingsError

from core.errors import Action, ConfigError, IpbatchError, RetryableError, classify
from ipbatch.cli import admin, jobs, services, training
from ipbatch.exits import EXIT_CONFIG, EXIT_UNREACHABLE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ipbatch", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (jobs, training, services, admin):
        group.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except RetryableError as exc:
        print(f"ipbatch: error: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except (ConfigError, IpbatchError) as exc:
        print(f"ipbatch: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (ValidationError, SettingsError) as exc:
        print(f"ipbatch: error: bad IPBATCH_* setting: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except SystemExit:
        raise
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `ipbatch manifest schema | head`: the reader had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # a service away or refusing (database, broker, S3): one line
        decision = classify(exc)
        if decision.action not in (Action.RETRY, Action.CONFIG):
            raise
        print(f"ipbatch: error: {decision.message}", file=sys.stderr)
        return EXIT_UNREACHABLE if decision.action is Action.RETRY else EXIT_CONFIG
