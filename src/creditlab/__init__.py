"""creditlab: biologically plausible credit assignment against backprop, on one harness.

Public entry points:

* :func:`creditlab.models.build_model` -- models from compact specs (``784-300-10``) or names;
* :func:`creditlab.algorithms.build_algorithm` -- algorithms from specs (``ar:steps=inf``);
* :func:`creditlab.train.train` -- the one training loop;
* ``creditlab`` -- the command line (:mod:`creditlab.cli`).
"""

from creditlab.errors import ConfigError, CreditlabError, DataError, DivergenceError

__version__ = "0.1.0"
__all__ = ["ConfigError", "CreditlabError", "DataError", "DivergenceError", "__version__"]
