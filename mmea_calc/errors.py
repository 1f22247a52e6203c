"""Typed errors of mmea_calc.

Every error raised on purpose by this package derives from :class:`MmeaCalcError` and also from
the builtin that best describes it, so ``except KeyError`` or ``except ValueError`` keep working.
"""

from __future__ import annotations

__all__ = [
    "AdapterExistsError",
    "AdapterFormatError",
    "AdapterNotFoundError",
    "BaseFormatError",
    "BaseModelError",
    "BaseModelMismatchError",
    "ConfigError",
    "DataError",
    "DemoError",
    "EmbeddedAssetsMissingError",
    "ExportError",
    "ExtrapolationError",
    "InvalidStructureError",
    "MmeaCalcError",
    "NoCandidateAdapterError",
    "NonFiniteResultError",
    "OutputExistsError",
    "TargetError",
    "UncalibratedAdapterWarning",
    "UnsupportedElementError",
]


class MmeaCalcError(Exception):
    """Base class of every error raised by mmea_calc."""


class ConfigError(MmeaCalcError, ValueError):
    """A bad configuration value (a keyword, an option, a hyper-parameter); the message names
    the value and what would be valid."""


class AdapterNotFoundError(MmeaCalcError, KeyError):
    """An adapter name that is not loaded (the message lists the valid names)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class AdapterExistsError(MmeaCalcError, ValueError):
    """An adapter of that name is already loaded."""


class AdapterFormatError(MmeaCalcError, ValueError):
    """An adapter directory is missing, corrupt, of an unknown version or of the wrong shape."""


class BaseModelError(MmeaCalcError, ValueError):
    """A base model cannot be loaded or is not a MACE model this package can adapt."""


class BaseFormatError(BaseModelError):
    """A safe base directory is missing, corrupt, of an unknown version or names a class
    outside the whitelist of mace-torch classes it may rebuild."""


class EmbeddedAssetsMissingError(MmeaCalcError, FileNotFoundError):
    """The base model or adapters shipped with the package (``mmea_calc/embedded/``) are absent."""


class BaseModelMismatchError(MmeaCalcError, ValueError):
    """An adapter was made for a different base model (fingerprints differ)."""


class TargetError(MmeaCalcError, ValueError):
    """A target pattern matched no adaptable module, or a module cannot be adapted."""


class UnsupportedElementError(MmeaCalcError, ValueError):
    """A structure holds elements the base model does not know."""


class InvalidStructureError(MmeaCalcError, ValueError):
    """A structure cannot be evaluated (empty, NaN positions, zero-volume cell, ...)."""


class NoCandidateAdapterError(MmeaCalcError, LookupError):
    """Automatic selection found no adapter whose elements cover the structure."""


class OutputExistsError(MmeaCalcError, FileExistsError):
    """The output directory already holds results (pass ``overwrite`` or ``resume``)."""


class ExtrapolationError(MmeaCalcError, RuntimeError):
    """A structure lies further outside the adapter's training range than the calculator's
    ``extrapolation_threshold`` allows (with ``on_extrapolation="error"``)."""


class NonFiniteResultError(MmeaCalcError, FloatingPointError):
    """The model produced NaN/inf energies or forces (a structure far outside its domain)."""


class DataError(MmeaCalcError, ValueError):
    """A dataset is empty, unreadable or lacks a requested key."""


class DemoError(MmeaCalcError, RuntimeError):
    """A step of ``mmea-calc demo`` misbehaved (wrong adapter, NaN, blow-up, no convergence...)."""


class ExportError(MmeaCalcError, ValueError):
    """A model cannot be exported as asked (an AdaptedModel without a frozen adapter, an
    unknown adapter, dtype or head, an existing output file)."""


class UncalibratedAdapterWarning(UserWarning):
    """An adapter records no gate ranges (a file written before they existed): its gates do
    not saturate outside the training data. ``mmea-calc calibrate`` records them."""
