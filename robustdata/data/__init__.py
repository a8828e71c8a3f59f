"""The data layer: sources -> webdataset shards + Parquet manifests + dataset cards."""
