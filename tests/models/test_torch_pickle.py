"""torch.save archives read without torch: written here in torch's format (a pickle with
torch's globals and persistent storage ids, storages as zip entries) by stand-in modules."""

import collections
import io
import os
import pickle
import sys
import types
from unittest import mock
import zipfile

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from affect_jax.models import convert, torch_pickle
from tests.models.test_convert import ENCODER, _timm_state


class _Storage:
  def __init__(self, kind, key, array):
    self.kind, self.key, self.array = kind, key, array


class _Tensor:
  """Pickles as torch pickles a tensor: _rebuild_tensor_v2(storage, offset, size, stride, ...)."""

  def __init__(self, rebuild, storage, offset, size, stride):
    self.args = (storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict())
    self.rebuild = rebuild

  def __reduce_ex__(self, protocol):
    return self.rebuild, self.args


def _fake_torch():
  """Modules named torch / torch._utils holding objects with torch's names, so pickle writes
  the globals torch writes (in sys.modules only while `_save` pickles: other libraries look
  for a real torch there)."""
  torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")
  def _rebuild_tensor_v2(*args):
    raise AssertionError("never called when writing")
  _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
  utils._rebuild_tensor_v2 = _rebuild_tensor_v2
  for name in torch_pickle.STORAGE_DTYPES:
    setattr(torch, name, type(name, (), {"__module__": "torch"}))
  torch._utils = utils
  return torch


_TORCH = _fake_torch()


def _save(path, obj, storages, prefix="archive"):
  """torch.save's zip layout: <prefix>/data.pkl, <prefix>/data/<key>, version, byteorder."""
  buf = io.BytesIO()
  pickler = pickle.Pickler(buf, protocol=2)
  pickler.persistent_id = lambda o: (("storage", getattr(_TORCH, o.kind), o.key, "cpu", o.array.size)
                                     if isinstance(o, _Storage) else None)
  with mock.patch.dict(sys.modules, {"torch": _TORCH, "torch._utils": _TORCH._utils}):
    pickler.dump(obj)
  with zipfile.ZipFile(path, "w") as z:
    z.writestr(f"{prefix}/data.pkl", buf.getvalue())
    z.writestr(f"{prefix}/byteorder", "little")
    for s in storages:
      z.writestr(f"{prefix}/data/{s.key}", s.array.astype(s.array.dtype.newbyteorder("<")).tobytes())
    z.writestr(f"{prefix}/version", "3\n")


def _tensor_dict(arrays: dict, nest=None):
  """{name: array} as torch would save it (one storage per tensor), optionally nested."""
  torch = _TORCH
  kinds = {np.dtype(v): k for k, v in torch_pickle.STORAGE_DTYPES.items()}
  storages, state = [], collections.OrderedDict()
  for i, (name, a) in enumerate(arrays.items()):
    s = _Storage(kinds[a.dtype], str(i), np.ascontiguousarray(a).reshape(-1))
    storages.append(s)
    stride = [int(np.prod(a.shape[k + 1:])) for k in range(a.ndim)]
    state[name] = _Tensor(torch._utils._rebuild_tensor_v2, s, 0, a.shape, stride)
  return (state if nest is None else {nest: state, "epoch": 3}), storages


def test_tensors_of_every_layout_come_back(tmp_path):
  rng = np.random.default_rng(0)
  torch = _TORCH
  base = rng.normal(size=24).astype(np.float32)
  shared = _Storage("FloatStorage", "0", base)
  half = _Storage("HalfStorage", "1", rng.normal(size=6).astype(np.float16))
  bf16 = _Storage("BFloat16Storage", "2", rng.normal(size=4).astype(ml_dtypes.bfloat16))
  longs = _Storage("LongStorage", "3", np.arange(5, dtype=np.int64))
  rebuild = torch._utils._rebuild_tensor_v2
  obj = {"model": collections.OrderedDict([
      ("w", _Tensor(rebuild, shared, 0, (4, 6), (6, 1))),
      ("w_t", _Tensor(rebuild, shared, 0, (6, 4), (1, 6))),   # a transposed view
      ("tail", _Tensor(rebuild, shared, 20, (2, 2), (2, 1))),  # an offset into the storage
      ("h", _Tensor(rebuild, half, 0, (2, 3), (3, 1))),
      ("b", _Tensor(rebuild, bf16, 0, (4,), (1,))),
      ("i", _Tensor(rebuild, longs, 0, (5,), (1,))),
      ("scalar", _Tensor(rebuild, longs, 2, (), ())),
  ])}
  path = str(tmp_path / "ckpt.pth")
  _save(path, obj, [shared, half, bf16, longs])
  read = zipfile.ZipFile.read
  with mock.patch.object(zipfile.ZipFile, "read", autospec=True, side_effect=read) as reads:
    got = torch_pickle.load(path)["model"]
  storages = [c.args[1] for c in reads.call_args_list if "/data/" in c.args[1]]
  assert sorted(storages) == [f"archive/data/{k}" for k in "0123"]  # the shared one read once
  np.testing.assert_array_equal(got["w"], base.reshape(4, 6))
  np.testing.assert_array_equal(got["w_t"], base.reshape(4, 6).T)
  np.testing.assert_array_equal(got["tail"], base[20:24].reshape(2, 2))
  np.testing.assert_array_equal(got["h"], half.array.reshape(2, 3))
  assert got["b"].dtype == ml_dtypes.bfloat16 and got["h"].dtype == np.float16
  np.testing.assert_array_equal(got["b"], bf16.array)
  np.testing.assert_array_equal(got["i"], np.arange(5))
  assert got["scalar"].shape == () and got["scalar"] == 2 and got["w_t"].flags.c_contiguous


def test_a_mae_pth_converts_like_its_safetensors(tmp_path):
  state = _timm_state("vit_cls")
  # facebookresearch/mae saves {'model': state_dict}; DataParallel adds 'module.'.
  obj, storages = _tensor_dict({f"module.{k}": v for k, v in state.items()}, nest="model")
  _save(str(tmp_path / "mae_pretrain_vit.pth"), obj, storages)
  safetensors.numpy.save_file(state, str(tmp_path / "same.safetensors"))
  a = convert.convert_checkpoint(str(tmp_path / "mae_pretrain_vit.pth"), "vit", "tiny", **ENCODER)
  b = convert.convert_checkpoint(str(tmp_path / "same.safetensors"), "vit", "tiny", **ENCODER)
  jax.tree.map(np.testing.assert_array_equal, a, b)


class _Evil:
  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_runs_code_is_refused_before_it_runs(tmp_path):
  evil = _Evil()
  evil.marker = str(tmp_path / "ran")
  path = str(tmp_path / "evil.pth")
  _save(path, {"model": {"w": evil}}, [])
  with pytest.raises(ValueError, match=rf"{path}: the checkpoint's pickle asks for "
                     rf"{os.system.__module__}\.system, which is not a tensor or a dict: refused"):
    convert.load_state_dict(path)
  assert not os.path.exists(evil.marker)


def test_not_torch_files_are_named(tmp_path):
  raw = tmp_path / "legacy.pth"
  raw.write_bytes(b"\x80\x02}q\x00.")
  with pytest.raises(ValueError, match=f"{raw}: not a torch.save zip archive"):
    convert.load_state_dict(str(raw))
  _save(str(tmp_path / "opt.pth"), {"optimizer": {"step": 1}}, [])
  with pytest.raises(ValueError, match=r"opt.pth: no state dict inside \(top-level keys: \['optimizer'\]\)"):
    convert.load_state_dict(str(tmp_path / "opt.pth"))
