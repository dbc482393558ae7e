"""Token shards: clean documents encoded, packed into fixed-length samples, written as tars + manifest."""
