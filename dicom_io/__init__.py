"""DICOM on its own: validating received instances, durable writes, SOP classes, and series-to-model-input preprocessing (no database, queue, web or torch code)."""
