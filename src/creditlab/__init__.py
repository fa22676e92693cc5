"""creditlab: biologically plausible credit assignment against backprop, on one harness.

Public entry points:

* :func:`creditlab.models.build_model` -- models from compact specs (``784-300-10``) or names;
* :func:`creditlab.algorithms.build_algorithm` -- algorithms from specs (``ar:steps=inf``);
* :func:`creditlab.train.train` -- the one training loop;
* ``creditlab`` -- the command line (:mod:`creditlab.cli`).
"""

from creditlab.errors import ConfigError, CreditlabError, DataError, DivergenceError

def _version() -> str:
    """The installed distribution's version (pyproject.toml is the one place it is written)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("creditlab")
    except PackageNotFoundError:  # imported from a source tree that was never installed
        return "0+unknown"


__version__ = _version()
__all__ = ["ConfigError", "CreditlabError", "DataError", "DivergenceError", "__version__"]
