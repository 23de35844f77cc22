"""Cached latents: writing a data set's latents to shards with a trained tokenizer (`writer`: the run; `plan`: the
units of work and the checks before a run; `sources`: what one unit reads) and reading them back for generator
training (`dataset`)."""
