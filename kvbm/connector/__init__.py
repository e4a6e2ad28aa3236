"""Engine-side code: the attachment to a node (shared by every engine
connector) and the connectors themselves (vLLM first)."""
