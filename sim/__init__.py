"""The test framework: simulated devices and homes, the whole stack on one box, experiments."""
