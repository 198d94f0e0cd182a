"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""


class CmoeError(Exception):
    """Base of every error that names a user's mistake and how to fix it."""


class SpecError(CmoeError):
    """An expert layout such as S2A2E16 that cannot be carved."""


class ModelError(CmoeError):
    """A model that cannot be found, loaded or carved."""


class DataError(CmoeError):
    """Text that cannot be found or is too short."""


class CheckpointError(CmoeError):
    """A directory that is not a complete carved checkpoint."""


class BenchError(CmoeError):
    """Benchmark options or models that cannot be measured as asked."""
