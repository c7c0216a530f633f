"""What every floor of kad stands on: plugin specs, optional dependencies, metrics, the
model-file format and progress reporting."""
