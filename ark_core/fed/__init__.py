"""Federation without Flower: aggregation, update codecs, privacy, configs, instruction.

Also the audit records and the site keys. Flower's message types stay in ``server`` and
``client``; everything here takes and returns torch tensors and plain Python.
"""
