"""lightning_techniques: deep-learning training techniques as Lightning callbacks, strategies and precision plugins
that you attach to a stock ``lightning.Trainer`` and your unmodified ``LightningModule``.

Every public technique is importable from here::

    from lightning_techniques import EarlyStopping, LSUVInit

Areas whose optional dependencies (captum, shap, kornia ...) are missing still import: those techniques import
their dependency when they are constructed and raise an error naming the extra to install.
"""

from lightning_techniques import augment as _augment
from lightning_techniques import data as _data
from lightning_techniques import evaluation as _evaluation
from lightning_techniques import finetune as _finetune
from lightning_techniques import init as _init
from lightning_techniques import interpret as _interpret
from lightning_techniques import normalization as _normalization
from lightning_techniques import optim as _optim
from lightning_techniques import regularization as _regularization
from lightning_techniques import reproducibility as _reproducibility
from lightning_techniques import search as _search
from lightning_techniques.augment import *  # noqa: F401,F403
from lightning_techniques.data import *  # noqa: F401,F403
from lightning_techniques.evaluation import *  # noqa: F401,F403
from lightning_techniques.finetune import *  # noqa: F401,F403
from lightning_techniques.init import *  # noqa: F401,F403
from lightning_techniques.interpret import *  # noqa: F401,F403
from lightning_techniques.normalization import *  # noqa: F401,F403
from lightning_techniques.optim import *  # noqa: F401,F403
from lightning_techniques.regularization import *  # noqa: F401,F403
from lightning_techniques.reproducibility import *  # noqa: F401,F403
from lightning_techniques.search import *  # noqa: F401,F403

__version__ = "0.1.0"

_AREAS = [_augment, _data, _evaluation, _finetune, _init, _interpret, _normalization, _optim, _regularization,
          _reproducibility, _search]
# The top level exports the techniques and the user-facing helpers (loss modules, export modules, samplers,
# captures); the functional cores live in ``lightning_techniques.functional``. Importing a core from the top level
# still works (with a FutureWarning) for code written against 0.1.
from lightning_techniques import functional  # noqa: E402

_MOVED_TO_FUNCTIONAL = frozenset(functional.__all__)
for _name in _MOVED_TO_FUNCTIONAL:
    globals().pop(_name, None)
__all__ = sorted({name for area in _AREAS for name in area.__all__} - _MOVED_TO_FUNCTIONAL)


def __getattr__(name: str):  # noqa: ANN202 - module-level __getattr__ (PEP 562)
    if name in _MOVED_TO_FUNCTIONAL:
        import warnings

        warnings.warn(
            f"lightning_techniques.{name} is deprecated: import it from lightning_techniques.functional "
            f"(the top level exports the techniques).", FutureWarning, stacklevel=2,
        )
        return getattr(functional, name)
    raise AttributeError(f"module 'lightning_techniques' has no attribute {name!r}")
