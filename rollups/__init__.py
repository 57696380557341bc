"""Ingestion-time rollups: retraction deltas, the aggregate router, and rebuilds.

A rollup row is a signed delta per (bucket, dimensions). The rollup's value is the
sum of its deltas, which is exact because every metric is a count or an integer sum
(see :mod:`tally.specs.metrics`): replacing a key's state subtracts its old
contribution and adds its new one.
"""
