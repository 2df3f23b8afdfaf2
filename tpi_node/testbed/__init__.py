"""The emulated testbed: N small machines on one Linux box (network namespaces, tc tbf, a user-space
delay relay, cgroups). Entry point: scripts/testbed (python -m tpi_node.testbed)."""
