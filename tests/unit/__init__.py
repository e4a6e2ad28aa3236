"""The fast tier: no processes, no root, no network, no etcd; all of it in
under a minute (`./scripts/test --unit`)."""
