"""The package version, in a module of its own so that submodules read it without importing ``sqdist``."""
__version__ = "0.1.0"
