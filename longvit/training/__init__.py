"""Training: LightningModules, DataModules and their command lines (imports Lightning)."""
