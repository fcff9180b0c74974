"""Re-export of the ``classifier`` / ``evaluate`` params sections (they live in :mod:`genmodels.configs.evaluate`)."""

from genmodels.configs.evaluate import ClassifierConfig, EvaluateConfig

__all__ = ["ClassifierConfig", "EvaluateConfig"]
