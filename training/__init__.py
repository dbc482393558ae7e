"""DeepSpeed training: typed configs -> DeepSpeed config, pretrain and fine-tune loops."""
