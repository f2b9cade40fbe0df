"""Every field of every shipped config is read by the code: a field nothing reads (a value
a user sets in vain) fails here. The check is by name: a leaf `a.b.name` must be read as
`.name`, `["name"]`, `.get("name"` or `.pop("name"` somewhere in affect_jax/ or launch/."""

import pathlib
import re

import ml_collections
import pytest

from configs import au, common, demo, expr, expr_finetune, extract, mae_pretrain, va

REPO = pathlib.Path(__file__).resolve().parents[1]
SOURCE = "\n".join(p.read_text() for p in [*REPO.glob("affect_jax/**/*.py"),
                                           *REPO.glob("launch/*.py")])


def _configs() -> dict[str, ml_collections.ConfigDict]:
  out = {}
  for preset in ("tiny", "base", "large", "huge"):
    out[f"mae_pretrain:{preset}"] = mae_pretrain.get_config(preset)
    out[f"expr_finetune:{preset}"] = expr_finetune.get_config(preset)
  out["extract"] = extract.get_config()
  for name, module in (("va", va), ("expr", expr), ("au", au)):
    for preset in ("paper", "tiny"):
      out[f"{name}:{preset}"] = module.get_config(preset)
  for preset in demo.PRESETS:
    out[f"demo:{preset}"] = demo.get_config(preset)
  return out


def _leaves(tree, prefix=""):
  for key, value in tree.items():
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}"


def _read(name: str) -> bool:
  n = re.escape(name)
  return re.search(rf"\.{n}\b|\[[\"']{n}[\"']\]|\.(get|pop)\([\"']{n}[\"']", SOURCE) is not None


def test_the_check_finds_an_unread_field():
  assert _read("segment_len") and _read("bootstrap_samples")
  assert not _read("segment_length_unused")


@pytest.mark.parametrize("name,config", sorted(_configs().items()))
def test_every_config_field_is_read(name, config):
  unread = [path for path in _leaves(config.to_dict()) if not _read(path.split(".")[-1])]
  assert not unread, f"{name}: nothing reads {unread}"
