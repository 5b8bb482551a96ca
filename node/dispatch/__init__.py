"""The dispatch stage: output series to destinations under policy. One module per
destination kind (:mod:`.dimse`, :mod:`.stow`) behind :mod:`.registry`; the policy and the
send loop in :mod:`.dispatcher`; shared types in :mod:`.base`."""
