"""The package version, apart from the package facade so that the library can read it."""

__version__ = "0.1.0"
