"""Old private home of the version, kept for one release: read :data:`sqdist.version.__version__`."""
from .version import __version__  # noqa: F401
