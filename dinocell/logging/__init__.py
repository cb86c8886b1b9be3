"""Training logs and metrics: the log file, JSON-lines metrics with a console summary, optional wandb."""

from dinocell.logging.metrics import MetricsLogger, setup_logging

__all__ = ["MetricsLogger", "setup_logging"]
