"""A video file -> one CSV row per frame (time, face box, face found, valence, arousal, 8
expression and 12 AU probabilities) and a PNG timeline, from trained temporal models.

  python launch/analyze_video.py --video=clip.mp4 --out_dir=/tmp/clip \
      --va=/tmp/va --expr=/tmp/expr --au=/tmp/au

Needs the video extra: pip install 'affect-jax[video]'. Installed, the same command is
`affect-jax-analyze-video`. See affect_jax/analyze.py for what each step does.
"""

from affect_jax import analyze

if __name__ == "__main__":
  analyze.cli()
