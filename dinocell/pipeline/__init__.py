"""The crop pipeline: samples -> multi-crop views -> iBOT masks -> collated batches, for any number of workers/ranks."""
