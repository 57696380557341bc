"""The embedded backend: Parquet segments on local disk, a SQLite catalog, DuckDB queries."""
