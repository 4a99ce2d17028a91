"""lightning_techniques: deep-learning training techniques as Lightning callbacks, strategies and precision plugins
that you attach to a stock ``lightning.Trainer`` and your unmodified ``LightningModule``.

Every public technique is importable from here::

    from lightning_techniques import EarlyStopping, LSUVInit
"""

from lightning_techniques import init as _init_area
from lightning_techniques import regularization as _regularization_area
from lightning_techniques.init import *  # noqa: F401,F403
from lightning_techniques.regularization import *  # noqa: F401,F403

__version__ = "0.1.0"

_AREAS = [_init_area, _regularization_area]
__all__ = sorted({name for area in _AREAS for name in area.__all__})
