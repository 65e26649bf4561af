"""The package version, in one place: `calm.__version__`, the classifier file header, results.json."""

__version__ = "0.1.0"
