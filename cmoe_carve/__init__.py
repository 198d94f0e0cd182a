"""cmoe-carve: carve a dense Hugging Face LM into a sparse Mixture-of-Experts (CMoE, MoNE).

Library entry points: `cmoe_carve.pipeline.carve(model, out, ...)` (a whole carve, as the CLI
runs it), `cmoe_carve.load_carved(DIR)`, and `cmoe_carve.CarveConfig`.
"""

import importlib

__version__ = "0.1.0"

from .errors import CmoeError  # noqa: E402

# Lazy, so that `cmoe --help` does not import transformers. (`cmoe_carve.carve` is the carving
# module itself; the one-call pipeline lives in `cmoe_carve.pipeline`.)
_LAZY = {"load_carved": "checkpoint", "CarveConfig": "carve"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(name)


__all__ = ["CmoeError", "CarveConfig", "load_carved", "__version__"]
