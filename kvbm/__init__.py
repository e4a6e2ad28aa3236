"""kvbm mesh: a multi-node KV-cache block manager for LLM inference engines.

The package holds the node's three tiers (engine G1, host arena G2, disk arena
G3), the manager that moves blocks between them, the engine connectors and the
CLI. It uses `transport` and `discovery`; they never import it.
"""

__version__ = "0.1.0"
