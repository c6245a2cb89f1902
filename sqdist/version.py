"""The package version, in a public module of its own so that subpackages read it without importing ``sqdist``."""
__version__ = "0.1.0"
