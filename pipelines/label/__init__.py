"""The labeling job: image objects in storage -> Ray Data -> Parquet pose tables (docs/architecture.md)."""
