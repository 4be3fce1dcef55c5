"""The curation runner: job keys, stores, current views, outcomes, job ranges and gc.

Stages declare jobs (:class:`Job`) from the current view of the stage before and turn each job into
an :class:`Outcome`; the runner owns everything else: keys (:mod:`.keys`), part files and manifests
(:mod:`.store`), the loop with its range lock (:mod:`.run`) and ``gc`` (:mod:`.gc`).
"""
from cultureclip.curate.runner.jobs import Job, Outcome, StageReport, job_id, job_range  # noqa: F401
from cultureclip.curate.runner.keys import canonical_json, digest, in_val, seed_from_key  # noqa: F401
from cultureclip.curate.runner.run import fingerprint, plan, run_stage, save_report, up_to_date  # noqa: F401
from cultureclip.curate.runner.store import Store, write_atomic  # noqa: F401
