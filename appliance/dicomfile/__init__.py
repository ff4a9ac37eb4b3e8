"""One DICOM file on its own: its header read and checked, its UIDs validated or derived.

The bottom of the package: nothing here imports the store, ingest or anything above.
"""
