"""sentencepiece tokenizer training on clean shards, its Hugging Face files and report."""
