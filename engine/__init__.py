"""synthnode engine: torch + MONAI models, tasks, training, phantoms. No DICOM imports."""
