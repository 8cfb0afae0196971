"""Validation data as users keep it: ``.npz`` files and shards (:mod:`~mpexport.data.base`, read through
:mod:`~mpexport.data.npz`: headers checked and sizes bounded by :mod:`~mpexport.data.limits` before anything is
decompressed), tables (:mod:`~mpexport.data.tables`), ``module:function`` batches (:mod:`~mpexport.data.callable`),
labels checked as class indices (:mod:`~mpexport.data.labels`), opened through
:func:`mpexport.data.open.load_validation_data`."""
