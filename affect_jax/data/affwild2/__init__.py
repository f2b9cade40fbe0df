"""Aff-Wild2 as ABAW distributes it: formats.py (names, annotation files), layout.py (the
tree, frames, labels), folds.py (splits, folds, summary), submission.py (prediction files).

The real dataset and the synthetic one (`affect_jax.data.synthetic`) are read by this
same code. Layout (DESIGN.md, "Aff-Wild2 on disk"):

  <root>/cropped_aligned/<video>/00001.jpg          1-based, 5 digits, some missing
  <root>/<TaskDir>/{Train_Set,Validation_Set}/<video>.txt
  <root>/<TaskDir>_test_set.txt                      test videos, one name a line
  <root>/test_labels/<TaskDir>/<video>.txt           (synthetic only) held-out labels
  <root>/audio/<video>.wav
"""

from affect_jax.tasks import (  # the task records' names and markers
    VA_NAMES, EXPR_NAMES, AU_NAMES, INVALID_VA, INVALID_EXPR, INVALID_AU)
from affect_jax.data.affwild2.formats import (
    TASKS, TASK_DIRS, TASK_COLUMNS, TRAIN_SET, VALIDATION_SET, SPLITS, TEST_SET, FRAMES_DIR,
    AUDIO_DIR, TEST_LABELS_DIR, FRAME_EXT, AUDIO_RATE, MAX_UNMATCHED_FRAMES, frame_name,
    task_test_list, AnnotationError, parse_annotation, valid_frames, write_annotation,
    invalid_labels)
from affect_jax.data.affwild2.layout import (
    source_video, audio_path, task_dir, image_indices, frames_fingerprint, audio_fingerprint,
    image_mask, nearest_image, repair_frames, VideoLabels, list_videos, load_video,
    max_unmatched, check_frames, load_split)
from affect_jax.data.affwild2.folds import (
    NUM_FOLDS, all_videos, fold_videos, fold_split, split_into_parts, summarize)
from affect_jax.data.affwild2.submission import (
    prediction_header, write_predictions, parse_predictions)

__all__ = [
    "TASKS", "TASK_DIRS", "VA_NAMES", "EXPR_NAMES", "AU_NAMES", "TASK_COLUMNS",
    "INVALID_VA", "INVALID_EXPR", "INVALID_AU", "TRAIN_SET", "VALIDATION_SET", "SPLITS",
    "TEST_SET", "FRAMES_DIR", "AUDIO_DIR", "TEST_LABELS_DIR", "FRAME_EXT", "AUDIO_RATE",
    "MAX_UNMATCHED_FRAMES", "frame_name", "task_test_list", "AnnotationError",
    "parse_annotation", "valid_frames", "write_annotation", "invalid_labels", "source_video",
    "audio_path", "task_dir", "image_indices", "frames_fingerprint", "audio_fingerprint",
    "image_mask", "nearest_image", "repair_frames", "VideoLabels", "list_videos",
    "load_video", "max_unmatched", "check_frames", "load_split", "NUM_FOLDS", "all_videos",
    "fold_videos", "fold_split", "split_into_parts", "summarize", "prediction_header",
    "write_predictions", "parse_predictions"
]
