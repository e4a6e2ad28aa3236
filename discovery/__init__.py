"""The block-location index: which node holds which block, in etcd under leases
(or in memory for a single node). Never imports `kvbm` or `transport`; keys
arrive as their fixed binary encoding.
"""
