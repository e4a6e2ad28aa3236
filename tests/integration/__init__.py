"""Real parts together: etcd, `kvbm node` processes, NIXL, the CLI."""
