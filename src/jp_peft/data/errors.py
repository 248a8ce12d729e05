"""Why a `jp-peft data prepare` run stopped: one class per cause, each with the exit status the CLI gives."""

from __future__ import annotations


class PrepareError(Exception):
    """The run stopped for a reason the user can act on; the message is one line.
    exit_code: 2 when an argument or an input file is unusable (nothing is written), 1 when the
    data or a worker failed the run."""

    exit_code = 1


class InputFileError(PrepareError, ValueError):
    """An input file cannot be read to its end (truncated or corrupt gzip, I/O error); names file:line."""

    exit_code = 2


class StrictModeError(PrepareError, RuntimeError):
    """--strict: the first rejected record stops the run; the message names file:line."""


class NothingKeptError(PrepareError):
    """Every record was rejected (or none was read): there is nothing to train on."""
