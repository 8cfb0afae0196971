"""Validation data as users keep it: ``.npz`` files and shards (:mod:`~mpexport.data.base`), tables
(:mod:`~mpexport.data.tables`), ``module:function`` batches (:mod:`~mpexport.data.callable`), opened through
:func:`mpexport.data.open.load_validation_data`."""
