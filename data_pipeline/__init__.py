"""Data preparation: cleaning, tokenizer training, token shards and the streaming loader."""
