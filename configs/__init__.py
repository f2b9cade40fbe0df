"""Experiment configs (ml_collections), one file per task; see each get_config()."""
