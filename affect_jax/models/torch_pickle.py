"""PyTorch `torch.save` checkpoints (.pth / .pt / .bin zip archives) read without torch and
without running code.

A `torch.save` file is a zip archive: `<name>/data.pkl` (a pickle of the saved object) and
`<name>/data/<key>` (each tensor storage's raw bytes). The pickle rebuilds tensors through
`torch._utils._rebuild_tensor_v2` and storages through persistent ids
('storage', <dtype>Storage, key, location, numel). This reader's unpickler resolves exactly
those globals (plus `collections.OrderedDict`) to numpy, and refuses every other one by name
before anything is called, so a checkpoint can never run code here (`torch.load` with
`weights_only=False` would). Tensors come back as numpy arrays with their dtype, shape and
strides.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile

import ml_dtypes
import numpy as np

STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
  """Stands in for torch.<dtype>Storage in the pickle: carries the dtype."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = np.dtype(STORAGE_DTYPES[name])


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata
  size, stride = tuple(size), tuple(stride)
  if not size:
    return np.array(storage[storage_offset])  # 0-d, an array like the others
  needed = storage_offset + 1 + sum((n - 1) * s for n, s in zip(size, stride) if n > 0)
  if min(size) > 0 and needed > storage.size:
    raise ValueError(f"a tensor of size {size} and stride {stride} at offset {storage_offset} "
                     f"runs past its storage of {storage.size} elements")
  item = storage.itemsize
  view = np.lib.stride_tricks.as_strided(storage[storage_offset:], size,
                                         tuple(s * item for s in stride))
  return np.array(view, order="C")  # an own, C-contiguous copy


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  del requires_grad, backward_hooks
  return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _Unpickler(pickle.Unpickler):

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, where: str):
    super().__init__(file)
    self._archive, self._prefix, self._where = archive, prefix, where
    self._storages: dict[str, np.ndarray] = {}  # views of one storage (and a state dict's
    # twin names for one parameter) each carry its persistent id: read it once

  def find_class(self, module, name):
    try:
      return _ALLOWED[(module, name)]
    except KeyError:
      raise pickle.UnpicklingError(
          f"{self._where}: the checkpoint's pickle asks for {module}.{name}, which is not a "
          "tensor or a dict: refused (a checkpoint is never allowed to run code here). Save "
          "the state dict alone (torch.save(model.state_dict(), path)) or as safetensors "
          "where you trust the file") from None

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
      raise pickle.UnpicklingError(f"{self._where}: unknown persistent id {pid!r}")
    storage_type, key = pid[1], str(pid[2])
    if key not in self._storages:
      try:
        data = self._archive.read(f"{self._prefix}data/{key}")
      except KeyError:
        raise pickle.UnpicklingError(f"{self._where}: storage {key} missing from the archive") from None
      self._storages[key] = np.frombuffer(data, storage_type.dtype.newbyteorder("<"))
    return self._storages[key]


def load(path: str):
  """The object a `torch.save` zip archive holds, tensors as numpy arrays. Raises ValueError
  (naming `path`) for a file that is not one, and for any global beyond tensors and dicts."""
  if not zipfile.is_zipfile(path):
    raise ValueError(f"{path}: not a torch.save zip archive (expected the zip file torch >= 1.6 "
                     "writes; a legacy torch file or another format): re-save it with a current "
                     "torch, or as safetensors")
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pickles) != 1:
      raise ValueError(f"{path}: a zip archive without one data.pkl (found {len(pickles)}): "
                       "not a torch.save file")
    prefix = pickles[0][: -len("data.pkl")]
    byteorder = f"{prefix}byteorder"
    if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
      raise ValueError(f"{path}: a big-endian torch file is not supported")
    try:
      return _Unpickler(io.BytesIO(archive.read(pickles[0])), archive, prefix, path).load()
    except pickle.UnpicklingError as e:
      raise ValueError(str(e)) from None
