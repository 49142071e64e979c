"""vm-host workload: host topology, placement and hypervisor backends, without Juju."""
