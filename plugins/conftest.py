"""The plugins' tests (plugins/*/tests) share the fixtures of the core suite: tests/conftest.py, loaded
by path (neither folder is a package) and its names made this conftest's own."""
import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("sqdist_tests_conftest",
                                               Path(__file__).resolve().parents[1] / "tests" / "conftest.py")
_core = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_core)
globals().update({name: value for name, value in vars(_core).items() if not name.startswith("__")})
