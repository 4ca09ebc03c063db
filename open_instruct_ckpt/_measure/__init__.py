"""Measurements: save statistics, checkpoint economics, the interval advisor, metrics for the Trainer's loggers."""
