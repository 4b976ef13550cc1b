"""pipeline: data sets, models, DVC stage entry points, training, unlearning and Dask scale-out.

Imports point one way: pipeline uses lrp_core and audits; neither imports pipeline.
"""
