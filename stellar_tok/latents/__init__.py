"""Cached latents: writing a data set's latents to shards with a trained tokenizer (`writer`) and reading them
back for generator training (`dataset`)."""
