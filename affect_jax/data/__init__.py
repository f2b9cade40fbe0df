"""Aff-Wild2 data layer, synthetic dataset, loaders."""
