"""Engine export: the format table, exporters, and parity against the PyTorch model."""
