"""The one version string: read by pyproject.toml (setuptools' dynamic
version) and re-exported as `zviz.__version__`."""

__version__ = "0.1.0"
