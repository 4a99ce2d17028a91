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
from lightning_techniques import init as _init
from lightning_techniques import interpret as _interpret
from lightning_techniques import normalization as _normalization
from lightning_techniques import optim as _optim
from lightning_techniques import regularization as _regularization
from lightning_techniques import reproducibility as _reproducibility
from lightning_techniques.augment import *  # noqa: F401,F403
from lightning_techniques.data import *  # noqa: F401,F403
from lightning_techniques.evaluation import *  # noqa: F401,F403
from lightning_techniques.init import *  # noqa: F401,F403
from lightning_techniques.interpret import *  # noqa: F401,F403
from lightning_techniques.normalization import *  # noqa: F401,F403
from lightning_techniques.optim import *  # noqa: F401,F403
from lightning_techniques.regularization import *  # noqa: F401,F403
from lightning_techniques.reproducibility import *  # noqa: F401,F403

__version__ = "0.1.0"

_AREAS = [_augment, _data, _evaluation, _init, _interpret, _normalization, _optim, _regularization, _reproducibility]
__all__ = sorted({name for area in _AREAS for name in area.__all__})
