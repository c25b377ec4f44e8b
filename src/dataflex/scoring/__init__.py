"""Scoring: what the components measure the model and the data with (losses, embeddings, gradients, probes).

Batched, length-grouped, sharded over ranks and gathered in index order by the engine; nothing here
decides anything or knows a component.
"""
