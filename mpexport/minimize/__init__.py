"""The repair search: the smallest set of extra FP32 nodes with which every deployable form passes verify's gate
(:mod:`mpexport.minimize.search`). ``mpexport repair`` (:mod:`mpexport.commands.repair`) runs it and commits what
it finds. The limits below bound the search; they live here so the command line reads them without importing it.
"""

STAGE = "repair"
MAX_FAILING = 256
"""Failing samples a trial is judged on, the worst first."""
GUARD_SAMPLES = 32
"""Passing samples judged with them, so that a set that breaks another sample is not taken."""
MAX_GROWTH = 8
"""Modules (or single nodes) localisation names, added one at a time, before the module-level search gives up."""
MAX_CONFIRMATIONS = 3
"""Rounds of search and confirmation on every sample (the samples a confirmation fails join the next round)."""
DEFAULT_MAX_TRIALS = 200
"""Trials (re-planned candidates judged in memory) one repair may run."""
