"""Floor 7: the `lmstack` command. Thin: turns flags and YAML recipes into typed config
objects and calls library functions. No library code parses arguments."""
