"""Kafka ingestion: decoding, validation, dead letters and the OLAP and search sinks."""
