"""Training: train(cfg) and the pieces it assembles (optimizer, schedules, loggers)."""
