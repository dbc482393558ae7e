"""The cleaning stage: raw sources -> clean, deduplicated document shards (``stage.run_clean``)."""
