"""The package version, read by the package front, exports and run provenance."""
__version__ = "0.1.0"
