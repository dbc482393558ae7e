"""Fine-tune tasks: data, features, metrics and decoding per head type."""
