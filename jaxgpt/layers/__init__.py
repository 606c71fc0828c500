"""Modules of the four variant axes: embedding, norm/block, mixer (attention); losses live in jaxgpt.losses."""
