"""The Transformer language model, its presets, heads, generation and Hugging Face conversion."""
