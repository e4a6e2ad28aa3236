"""The node daemon: one per machine, owning G2/G3, the NIXL agent, the peer
RPC server, the index, and the unix socket engines attach to."""
