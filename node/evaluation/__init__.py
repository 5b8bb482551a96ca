"""Research tooling that needs DICOM (the engine has no DICOM imports): real CT / MR slices
from pydicom and pydicom-data turned into engine volumes for evaluation. Loaded only by
``synthnode engine evaluate``, never by the running node."""
