"""MedCap service: settings, audit database, DICOM listener, study assembly and the command line."""
