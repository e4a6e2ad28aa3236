"""Moving blocks between nodes: the NIXL agent wrapper, the peer control RPC and
remote pulls. Never imports `kvbm` or `discovery`; where it must touch a node's
tiers it declares the small protocol it needs and `kvbm` implements it.
"""
