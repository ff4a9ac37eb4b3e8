"""Synthetic CT phantoms written as valid DICOM series, for tests, benchmarks, demos and training."""
