"""YAML data shipped with the toolchain: devices/*.yaml (targets) and recipes/*.yaml (ready-made jobs)."""
