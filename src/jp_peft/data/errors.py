"""Why a `jp-peft data prepare` run stopped: one class per cause, each with the exit status the CLI gives."""

from __future__ import annotations

import signal


class PrepareError(Exception):
    """The run stopped for a reason the user can act on; the message is one line.
    exit_code: 2 when an argument or an input file is unusable (nothing is written), 1 when the
    data or a worker failed the run."""

    exit_code = 1


class ConfigError(PrepareError, ValueError):
    """An argument is invalid; the message names the flag."""

    exit_code = 2


class InputFileError(PrepareError, ValueError):
    """An input file cannot be read to its end (truncated or corrupt gzip, I/O error); names file:line."""

    exit_code = 2


class StrictModeError(PrepareError, RuntimeError):
    """--strict: the first rejected record stops the run; the message names file:line."""


class NothingKeptError(PrepareError):
    """Every record was rejected (or none was read): there is nothing to train on."""


class WorkerError(PrepareError):
    """A worker process died; the run stops rather than waiting for it."""


class Terminated(PrepareError):
    """SIGTERM arrived (scancel, a stage's time limit): stopped, temporary files removed."""

    exit_code = 128 + signal.SIGTERM
