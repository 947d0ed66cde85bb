"""DICOM on its own: validating received instances, durable writes, SOP classes (no database, queue or web code)."""
