"""cmoe-carve: carve a dense Hugging Face LM into a sparse Mixture-of-Experts (CMoE, MoNE)."""

__version__ = "0.1.0"

from .errors import CmoeError  # noqa: E402


def __getattr__(name):
    # Lazy: `import cmoe_carve` stays cheap (the CLI's --help must not import transformers).
    if name == "load_carved":
        from .checkpoint import load_carved

        return load_carved
    if name in ("carve", "CarveConfig"):
        from . import carve as _carve, pipeline

        return pipeline.carve if name == "carve" else _carve.CarveConfig
    raise AttributeError(name)


__all__ = ["CmoeError", "CarveConfig", "carve", "load_carved", "__version__"]
