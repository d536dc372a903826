"""The exceptions modelfactory raises.

One small hierarchy: every error the library raises on purpose derives from
:class:`ModelFactoryError`, so a caller (and the CLI) can tell "your input is
wrong, here is how to fix it" apart from a bug.  Messages say what was wrong,
the value received, and what to do.
"""
from __future__ import annotations

import traceback

__all__ = [
    "ModelFactoryError",
    "DatasetError",
    "SchemaError",
    "PlanError",
    "ModelError",
    "ParameterError",
    "NotFittedError",
    "StoreError",
    "IntegrityError",
    "ClusterError",
    "IngestError",
    "describe_error",
]


class ModelFactoryError(Exception):
    """Base class of every error modelfactory raises on purpose."""


class DatasetError(ModelFactoryError):
    """The input dataset cannot be found, opened or read."""


class SchemaError(ModelFactoryError):
    """A column is missing, has the wrong type, or holds values we refuse."""


class PlanError(ModelFactoryError):
    """The job cannot be planned (for example a bad unit size)."""


class ModelError(ModelFactoryError):
    """A model name, class or definition is unusable."""


class ParameterError(ModelError, ValueError):
    """A model parameter is unknown or out of range."""


class NotFittedError(ModelError, AttributeError):
    """A model was used for scoring before it was fitted."""


class StoreError(ModelFactoryError):
    """The model store is missing, unreadable or inconsistent."""


class IntegrityError(StoreError):
    """A stored file failed its checksum or signature check."""


class ClusterError(ModelFactoryError):
    """A Dask cluster could not be created, reached or used."""


class IngestError(ModelFactoryError):
    """Ingesting data from an external source failed."""


#: What user code (a function, a model) may raise that fails its group or key, not the run:
#: any exception, and ``SystemExit`` (``sys.exit()`` in a function).  ``KeyboardInterrupt``
#: still stops the run.
GROUP_ERRORS = (Exception, SystemExit)


def describe_error(err: BaseException, *, located: bool = True) -> str:
    """One line for an error raised by user code.

    ``TypeName: message (at file:line in function)``, for the innermost frame; without the
    place when ``located`` is False (an error in converting what the user's function returned:
    the place would be modelfactory's or Arrow's, not the user's).
    """
    message = "; ".join(part.strip() for part in str(err).splitlines() if part.strip())  # one line
    text = f"{type(err).__name__}: {message}"
    tb = traceback.extract_tb(err.__traceback__) if err.__traceback__ and located else []
    if tb:
        fr = tb[-1]
        if fr.filename == "<dynamic-code>":  # code cloudpickle sent by value (a notebook's, a script's): no file
            text += f" (at line {fr.lineno} of {fr.name}, in code sent by value from the client)"
        else:
            text += f" (at {fr.filename.rsplit('/', 1)[-1]}:{fr.lineno} in {fr.name})"
    return text
