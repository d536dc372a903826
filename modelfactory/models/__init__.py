"""The model registry (after fsspec's): built-in models by name, user models by registration.

Built-ins are listed in one table of import paths; nothing heavy is imported
until a name is used.

>>> from modelfactory import models
>>> models.get("seasonal", season_length=24)
SeasonalProfile()
>>> "holt_winters" in models.registry
True
>>> models.get("holt_winter")
Traceback (most recent call last):
...
modelfactory.exceptions.ModelError: Unknown model 'holt_winter'. Did you mean 'holt_winters'? ...

Built-in models:

=================  =====================================================  ==========
name               what                                                   fits
=================  =====================================================  ==========
seasonal           median and MAD per season slot                         batch
holt_winters       additive Holt-Winters, grid-searched for a whole batch batch
ets                statsmodels ETSModel (additive), exact likelihood      per series
sarimax            statsmodels SARIMAX                                    per series
isolation_forest   scikit-learn IsolationForest on feature rows           per series
random_forest      scikit-learn RandomForestRegressor, features -> target per series
autoencoder        scikit-learn MLPRegressor reconstructing windows       per series
=================  =====================================================  ==========
"""
from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterator, Mapping
from typing import Any

from ..exceptions import ModelError
from .base import Model, Param, SeriesBatch, SkipGroup, debounce, robust_score

__all__ = ["registry", "get", "register_model", "unknown_model", "Model", "Param", "SeriesBatch",
           "SkipGroup", "debounce", "robust_score"]

#: name -> (import path, hint shown when an optional dependency is missing)
_SM = "It needs statsmodels: pip install statsmodels"
_SK = "It needs scikit-learn: pip install scikit-learn"
_BUILTIN: dict[str, tuple[str, str]] = {
    "seasonal": ("modelfactory.models.seasonal:SeasonalProfile", ""),
    "holt_winters": ("modelfactory.models.holt_winters:HoltWinters", ""),
    "ets": ("modelfactory.models.statespace:ETS", _SM),
    "sarimax": ("modelfactory.models.statespace:SARIMAX", _SM),
    "isolation_forest": ("modelfactory.models.forests:IsolationForest", _SK),
    "random_forest": ("modelfactory.models.forests:RandomForest", _SK),
    "autoencoder": ("modelfactory.models.autoencoder:Autoencoder", _SK),
}
_USER: dict[str, type] = {}


def optional_package(name: str, *, scoring: bool = False) -> tuple[str, str] | None:
    """The optional package a built-in model ``name`` imports when it fits (lazily: the class
    itself imports without it), and the hint to install it; None for the others.  ``scoring``:
    only if scoring needs it too (statsmodels rebuilds ets's and sarimax's fitted models; the
    scikit-learn models score in numpy)."""
    hint = _BUILTIN.get(name, ("", ""))[1] if name not in _USER else ""
    if not hint or (scoring and hint != _SM):
        return None
    return {_SM: "statsmodels", _SK: "sklearn"}[hint], hint


def _load(name: str) -> type:
    if name in _USER:
        return _USER[name]
    path, hint = _BUILTIN[name]
    mod, _, attr = path.partition(":")
    try:
        return getattr(importlib.import_module(mod), attr)
    except ImportError as err:
        raise ModelError(f"Model {name!r} needs a package that is not installed ({err.name}). {hint}") from err


class _Registry(Mapping):
    """A read-only mapping from model name to model class."""

    def __getitem__(self, name: str) -> type:
        if name not in _BUILTIN and name not in _USER:
            raise KeyError(name)
        return _load(name)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted({*_BUILTIN, *_USER}))

    def __len__(self) -> int:
        return len({*_BUILTIN, *_USER})

    def __repr__(self) -> str:
        return f"<model registry: {', '.join(self)}>"


registry: Mapping[str, type] = _Registry()


def unknown_model(name: str) -> ModelError:
    close = difflib.get_close_matches(name, list(registry), n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    if "." in name and not close:  # a class's dotted path: a name is looked up, never imported
        hint = (" A model is named as registered, not by its module: pass a class of your own to "
                "modelfactory.train(model=TheClass) from Python, or register it in this process "
                "(modelfactory.register_model); the command line trains the models known here.")
    return ModelError(f"Unknown model {name!r}.{hint} Known models: {', '.join(registry)}.")


def stored_class(name: str) -> type:
    """The class of models stored natively under ``name`` (a clear error if none is registered)."""
    if name not in registry:
        raise ModelError(f"The stored models are {name!r} models, and no model of that name is registered in "
                         f"this process: call modelfactory.register_model({name!r}, TheClass) first.")
    return registry[name]


def get(name: str, **params: Any) -> Model:
    """Make the model registered as ``name`` with ``params``.

    Unknown names raise :class:`~modelfactory.exceptions.ModelError` with a
    "did you mean" hint; unknown parameters raise
    :class:`~modelfactory.exceptions.ParameterError` naming the closest one.

    >>> get("holt_winters", season_length=24).season_length
    24
    >>> get("seasonl")
    Traceback (most recent call last):
    ...
    modelfactory.exceptions.ModelError: Unknown model 'seasonl'. Did you mean 'seasonal'? ...
    """
    if name not in registry:
        raise unknown_model(name)
    return registry[name](**params)


def register_model(name: str, cls: type, *, overwrite: bool = False) -> None:
    """Register a user model class under ``name`` so it can be used by name.

    The class should follow :class:`Model`'s protocol.  Built-in names cannot
    be replaced.

    Examples
    --------
    >>> from modelfactory.models.seasonal import SeasonalProfile
    >>> class Weekly(SeasonalProfile):
    ...     pass
    >>> register_model("weekly_doc_example", Weekly)
    >>> get("weekly_doc_example", season_length=168).season_length
    168
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ModelError(f"A model name must be an identifier like 'my_model'; got {name!r}.")
    if name in _BUILTIN or (name in _USER and not overwrite):
        raise ModelError(f"A model named {name!r} is already registered; pick another name"
                         + ("" if name in _BUILTIN else " or pass overwrite=True") + ".")
    if not isinstance(cls, type):
        raise ModelError(f"register_model needs a class; got {type(cls).__name__}.")
    _USER[name] = cls
