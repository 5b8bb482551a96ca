"""DICOM knowledge of the node, one home each: codes and output formats (:mod:`.codes`),
encoding checks (:mod:`.encoding`), Part 10 files (:mod:`.part10`), volume assembly from
series (:mod:`.volume`) and the synthetic series builder (:mod:`.series`)."""
