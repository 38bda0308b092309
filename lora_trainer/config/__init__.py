"""The config: typed, frozen sections validated once, before any model loads; the YAML, `--set` overrides,
error messages and the generated reference."""
