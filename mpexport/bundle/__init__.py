"""The output directory: one name per artifact (:mod:`~mpexport.bundle.names`), the manifest's typed records
(:mod:`~mpexport.bundle.records`), the store that opens, checks and commits it (:mod:`~mpexport.bundle.store`) and
the staging of new directories (:mod:`~mpexport.bundle.staging`)."""
