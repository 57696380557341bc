"""The producer side, as domain teams run it: publishing events to the datasource
topics, the synthetic generator, and the malformed messages a real log carries."""
