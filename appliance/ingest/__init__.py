"""Getting DICOM instances into the store: validation and importing."""
