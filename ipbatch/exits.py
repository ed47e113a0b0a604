"""The exit codes of every `ipbatch` command (README, "Exit codes")."""

from __future__ import annotations

EXIT_OK = 0  # done; a job: succeeded, every row
EXIT_FAILED = 1  # a job partial: some rows failed (`verify`: some outputs missing or broken)
EXIT_CONFIG = 2  # usage or configuration: a setting, a file, credentials a service refused
EXIT_UNREACHABLE = 3  # a service (database, broker, S3) did not answer: try again later
EXIT_JOB_FAILED = 4  # a job failed: no row succeeded, its manifest unreadable, or stopped early
EXIT_CANCELLED = 5  # a job cancelled
JOB_EXIT = {"succeeded": EXIT_OK, "partial": EXIT_FAILED, "failed": EXIT_JOB_FAILED}


def job_exit(status: str) -> int:
    """The exit code of a command that waited for a job to end with `status`."""
    return JOB_EXIT.get(status, EXIT_CANCELLED if status == "cancelled" else EXIT_FAILED)
