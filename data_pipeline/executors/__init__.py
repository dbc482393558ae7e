"""Where per-input work runs: in this process, in local worker processes, or on a Ray cluster."""
