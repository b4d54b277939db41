"""Dependencies that need a hand on today's releases.

- `robustbench` (1.1.1, from PyPI) imports fra31's unpublished `autoattack`
  (`autoattack.AutoAttack`, `autoattack.state.EvaluationState`). When no real `autoattack` package
  is installed, `install_autoattack_adapter()` registers `advgkl.legacy_autoattack` (the legacy
  API over PyPI's `pyautoattack`) under that name; a real package is left untouched.
  `pkg_resources`, which robustbench also imports, comes from the pinned setuptools (< 81).
- `imagecorruptions` (1.1.2, 2020; Hendrycks & Dietterich's corruption code) calls two APIs that
  its dependencies removed since: `np.float_` (NumPy 2.0; its fog) and scikit-image's
  `gaussian(..., multichannel=True)` (now `channel_axis=-1`; its glass blur); and its impulse
  noise calls `skimage.util.random_noise`, which since scikit-image 0.19 draws from a generator
  of its own, unseeded, so no seed made a copy reproducible. `import_imagecorruptions()` gives
  its corruption module the two names back and hands random_noise a seed drawn from NumPy's
  global stream (which the caller seeds), in that module only; its code runs otherwise as
  published.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any

from advgkl.errors import UserError


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


class _ModuleWith:
    """`module` as one module's globals see it, with `names` given back or replaced."""

    def __init__(self, module: Any, **names: Any) -> None:
        self._module, self._names = module, names

    def __getattr__(self, name: str) -> Any:
        return self._names[name] if name in self._names else getattr(self._module, name)


def _gaussian(image: Any, sigma: Any = 1, multichannel: bool | None = None, **kw: Any) -> Any:
    """scikit-image's gaussian, taking the `multichannel=True` of releases before 0.19."""
    from skimage.filters import gaussian

    if multichannel:
        kw["channel_axis"] = -1
    return gaussian(image, sigma=sigma, **kw)


def _seeded_random_noise(image: Any, **kw: Any) -> Any:
    """scikit-image's random_noise, seeded from NumPy's global stream."""
    import numpy
    import skimage.util

    return skimage.util.random_noise(image, rng=numpy.random.randint(2 ** 31), **kw)


def import_imagecorruptions() -> ModuleType:
    """`imagecorruptions` with its corruption module given `np.float_`, the old `gaussian`
    signature and a seeded random_noise; a missing package is one line naming the extra that
    installs it."""
    try:
        with warnings.catch_warnings():  # its pkg_resources import's deprecation notice
            warnings.simplefilter("ignore")
            module = importlib.import_module("imagecorruptions")
    except ImportError as exc:
        raise UserError(f"advgkl data corrupt needs imagecorruptions ({exc}); install it with "
                        "pip install 'advgkl[corruptions]'") from None
    corruptions = module.corruptions
    if not getattr(corruptions, "_advgkl_compat", False):
        import numpy
        import skimage
        import skimage.util

        corruptions.np = _ModuleWith(numpy, float_=numpy.float64)
        corruptions.sk = _ModuleWith(skimage, util=_ModuleWith(
            skimage.util, random_noise=_seeded_random_noise))
        corruptions.gaussian = _gaussian
        corruptions._advgkl_compat = True
    return module
