"""Search spaces shipped with iterkd (YAML files; see docs/spaces.md)."""
