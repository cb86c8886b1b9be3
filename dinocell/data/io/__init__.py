"""File and object-store I/O shared by the dataset families: TIFF decoding, load_data indexes, S3, caches."""
