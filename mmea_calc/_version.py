"""The package version, at the bottom of the import graph: every module reads it from here (no
module imports the package top, ``mmea_calc/__init__.py``)."""

__version__ = "0.1.0"
