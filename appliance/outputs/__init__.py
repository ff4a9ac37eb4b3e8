"""What the appliance sends back: DICOM SR of findings and Secondary Capture key images (highdicom)."""
