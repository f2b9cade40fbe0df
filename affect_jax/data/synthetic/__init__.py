"""Seeded synthetic Aff-Wild2: rendered faces, audio and labels from a known latent affect.

  dynamics.py  latent valence/arousal, expressions, AU intensities; the annotator model
  render.py    faces whose AUs move visible parts; camera nuisance (pose, light, blur, ...)
  audio.py     speech-like audio following arousal
  writer.py    the Aff-Wild2 layout, `synthetic_manifest.json` and `oracle.json`
"""

from affect_jax.data.synthetic.writer import SyntheticConfig, generate, summarize

__all__ = ["SyntheticConfig", "generate", "summarize"]
