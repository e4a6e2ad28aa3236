"""The whole system under vLLM, faults, attacks, network namespaces and a soak."""
