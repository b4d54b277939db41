"""Make `robustbench` (1.1.1, from PyPI) importable without fra31's unpublished `autoattack`.

robustbench imports `autoattack.AutoAttack` and `autoattack.state.EvaluationState`. When no real
`autoattack` package is installed, `install_autoattack_adapter()` registers `advgkl.legacy_autoattack`
(the legacy API over PyPI's `pyautoattack`) under that name; a real package is left untouched.
`pkg_resources`, which robustbench also imports, comes from the pinned setuptools (< 81).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings
from types import ModuleType


def real_autoattack_installed() -> bool:
    """True when an `autoattack` package other than our adapter is importable."""
    module = sys.modules.get("autoattack")
    if module is not None:
        return getattr(module, "__name__", "") != "advgkl.legacy_autoattack"
    return importlib.util.find_spec("autoattack") is not None


def install_autoattack_adapter() -> bool:
    """Register the adapter as `autoattack` unless a real one exists; True if it was registered."""
    if real_autoattack_installed():
        return False
    from advgkl import legacy_autoattack

    sys.modules["autoattack"] = legacy_autoattack
    sys.modules["autoattack.state"] = legacy_autoattack.state
    return True


def import_robustbench() -> ModuleType:
    """`import robustbench`, with the adapter in place when needed."""
    install_autoattack_adapter()
    with warnings.catch_warnings():  # its dependencies' deprecation notices are not the user's
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
        return importlib.import_module("robustbench")
