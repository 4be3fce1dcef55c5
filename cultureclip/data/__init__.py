"""Twin-pair data: shard writing, the streaming pipeline and the embedded toy set."""
