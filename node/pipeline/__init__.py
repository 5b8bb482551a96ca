"""The pipeline stage: study completion (:mod:`.completion`), routing rules (:mod:`.rules`),
the job state machine and local worker pool (:mod:`.jobs`), the Celery broker
(:mod:`.broker`), engine runners (:mod:`.runner`), the quality gate (:mod:`.quality`), the
orchestrator that ties them together (:mod:`.orchestrator`) and its tables (:mod:`.tables`).

Import from the modules; this package imports nothing (the broker and workers load only
what they need).
"""
