"""Datasets: tokenizer, shard format, preparation and loaders."""
