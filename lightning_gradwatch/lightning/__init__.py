"""The Lightning adapter's helpers: what only makes sense inside a Trainer (strategy checks, optimizer steps, loggers, TensorBoard, the run's diagnosis)."""
