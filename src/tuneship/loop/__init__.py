"""The learning loop: store, feedback -> examples, trigger + lease, cycle, gate, registry."""
