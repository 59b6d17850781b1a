"""The paper's simulation-based test framework: an RP simulator, a DSO simulator and ``mhp-sim experiment``."""
