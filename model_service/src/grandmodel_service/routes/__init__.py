"""HTTP routes by concern: probes, predictions, admin. Each receives the ``Runtime``."""
