"""Audio features on the video frame clock.

References are computed here independently: mel band centres and triangles from the HTK
formula, a per-frame log-mel by plain loops, WAVs written with `wave`/`struct`, DCTs by scipy.
"""

import dataclasses
import json
import struct
import wave

import numpy as np
import pytest
from scipy import fft

from affect_jax.data import audio, synthetic
from affect_jax.data.affwild2 import AUDIO_DIR, AUDIO_RATE

SR = AUDIO_RATE
N_MELS = 64
F0 = N_MELS + audio.PROSODY_NAMES.index("f0")
VOICING = N_MELS + audio.PROSODY_NAMES.index("voicing")
LOG_RMS = N_MELS + audio.PROSODY_NAMES.index("log_rms")


def _mel(f):
  return 2595 * np.log10(1 + np.asarray(f) / 700)


def _hz(m):
  return 700 * (10 ** (np.asarray(m) / 2595) - 1)


def _band_points(n_mels=N_MELS, fmax=SR / 2):
  return _hz(np.linspace(0, _mel(fmax), n_mels + 2))


def _tone(freq, seconds=1.0, amplitude=0.5, rate=SR):
  t = np.arange(int(seconds * rate)) / rate
  return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


# ---- Mel filterbank and the spectrum ----


def test_filterbank_is_htk_triangles():
  bank = audio.mel_filterbank(SR, 512, N_MELS)
  points = _band_points()
  freqs = np.arange(257) * SR / 512
  assert bank.shape == (257, N_MELS) and bank.dtype == np.float32
  for i in (0, 10, 40, 63):
    left, centre, right = points[i:i + 3]
    rise, fall = (freqs - left) / (centre - left), (right - freqs) / (right - centre)
    expected = np.clip(np.minimum(rise, fall), 0, None)
    np.testing.assert_allclose(bank[:, i], expected, atol=1e-6)
  # Peak-1 triangles overlapping at neighbours' centres sum to 1 between the outer centres.
  inside = (freqs >= points[1]) & (freqs <= points[-2])
  np.testing.assert_allclose(bank[inside].sum(axis=1), 1, atol=1e-5)
  area = audio.mel_filterbank(SR, 4096, 16, slaney_norm=True).sum(axis=0) * SR / 4096
  np.testing.assert_allclose(area, 1, rtol=0.02)


@pytest.mark.parametrize("freq", [300.0, 1000.0, 3000.0])
def test_pure_tone_peaks_in_the_band_centred_nearest(freq):
  centres = _band_points()[1:-1]
  feats = audio.frame_features(_tone(freq), SR, 30, 30.0)
  # Interior frames (the first and last half-windows see the track's edges).
  assert (np.argmax(feats[1:-1], axis=1) == np.argmin(np.abs(centres - freq))).all()


def _reference_logmel(x, k, fps, n_sub, win=400, n_fft=512):
  """Frame k's log-mel by plain loops: mean mel power of n_sub Hann windows, then log."""
  w = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)
  points = _band_points()
  freqs = np.arange(n_fft // 2 + 1) * SR / n_fft
  bank = np.stack([np.clip(np.minimum((freqs - points[i]) / (points[i + 1] - points[i]),
                                      (points[i + 2] - freqs) / (points[i + 2] - points[i + 1])), 0, None)
                   for i in range(N_MELS)], axis=1)
  mel = np.zeros(N_MELS)
  for j in range(n_sub):
    t = k / fps + (j + 0.5 - n_sub / 2) / (n_sub * fps)
    c = int(np.floor(t * SR + 0.5))
    seg = np.array([x[i] if 0 <= i < len(x) else 0.0 for i in range(c - win // 2, c + win // 2)])
    power = np.abs(np.fft.rfft(seg * w, n_fft)) ** 2 / w.sum() ** 2
    mel += power @ bank / n_sub
  return np.log(mel + 1e-10)


@pytest.mark.parametrize("fps,n_sub", [(30.0, 3), (25.0, 4)])
def test_logmel_matches_plain_reference(fps, n_sub):
  x = np.random.default_rng(0).standard_normal(SR // 2 + 7).astype(np.float32) * 0.1
  num_frames = 16  # the last frames lie past the track's end: zero-padded, not dropped
  feats = audio.frame_features(x, SR, num_frames, fps)
  for k in (0, 1, 7, 12, 15):
    np.testing.assert_allclose(feats[k], _reference_logmel(x, k, fps, n_sub), atol=1e-4, rtol=0)


@pytest.mark.parametrize("fps", [25.0, 30.0, 29.97])
@pytest.mark.parametrize("t", [0.0, 0.013, 0.5, 0.987, 1.0 - 1 / SR])
def test_click_lands_on_its_frame(fps, t):
  x = np.zeros(SR, np.float32)
  x[int(round(t * SR))] = 1.0
  num_frames = int(fps) + 2  # the video runs a little past the audio
  feats = audio.frame_features(x, SR, num_frames, fps, kind="logmel+prosody")
  assert np.argmax(feats[:, LOG_RMS]) == round(t * fps)
  assert np.argmax(np.exp(feats[:, :N_MELS]).sum(axis=1)) == round(t * fps)


@pytest.mark.parametrize("fps", [25.0, 30.0, 29.97])
@pytest.mark.parametrize("kind", audio.KINDS)
def test_exactly_one_row_per_frame(fps, kind):
  rng = np.random.default_rng(1)
  num_frames = 37
  exact = num_frames / fps * SR
  for n in (int(exact) | 1, int(exact * 0.5) | 1, int(exact * 2) | 1, 401, 1):  # odd sample counts
    feats = audio.frame_features(rng.standard_normal(n), SR, num_frames, fps, kind=kind)
    assert feats.shape == (num_frames, audio.AudioFeatureConfig(kind=kind).dim)
    assert feats.dtype == np.float32 and np.isfinite(feats).all()
  assert audio.frame_features(np.zeros(0), SR, 5, fps, kind=kind).shape[0] == 5
  empty = audio.frame_features(np.zeros(100), SR, 0, fps, kind=kind)
  assert empty.shape == (0, audio.AudioFeatureConfig(kind=kind).dim)


def test_frame_centres():
  np.testing.assert_array_equal(audio.frame_centres(4, 25.0, SR), [0, 640, 1280, 1920])
  np.testing.assert_array_equal(audio.frame_centres(4, 30.0, SR), [0, 533, 1067, 1600])
  k = np.arange(10_000)
  np.testing.assert_array_equal(audio.frame_centres(10_000, 29.97, SR), np.floor(k * SR / 29.97 + 0.5))


def test_config_dims_and_overrides():
  assert [audio.AudioFeatureConfig(kind=k).dim for k in audio.KINDS] == [64, 20, 68]
  with pytest.raises(ValueError, match="unknown audio feature kind"):
    audio.AudioFeatureConfig(kind="spectrogram")
  with pytest.raises(TypeError):
    audio.frame_features(np.zeros(100), SR, 2, 30.0, n_melz=10)
  cfg = audio.AudioFeatureConfig(kind="mfcc", n_mels=40, n_mfcc=13)
  assert audio.frame_features(np.zeros(1000), SR, 3, 30.0, cfg).shape == (3, 13)
  assert audio.AudioFeatureConfig(**dataclasses.asdict(cfg)) == cfg


def test_mfcc_is_dct_of_logmel():
  x = np.random.default_rng(2).standard_normal(SR).astype(np.float32)
  logmel = audio.frame_features(x, SR, 30, 30.0)
  mfcc = audio.frame_features(x, SR, 30, 30.0, kind="mfcc", n_mfcc=13)
  np.testing.assert_allclose(mfcc, fft.dct(logmel.astype(np.float64), type=2, norm="ortho")[:, :13],
                             rtol=1e-5, atol=1e-4)


# ---- Prosody ----


@pytest.mark.parametrize("f0", [90.0, 200.0, 350.0])
def test_pitch_of_a_harmonic_tone(f0):
  t = np.arange(SR) / SR
  x = sum(np.sin(2 * np.pi * f0 * h * t + h) / h for h in range(1, 7)) * 0.2
  feats = audio.frame_features(x, SR, 30, 30.0, kind="logmel+prosody")[2:-2]
  np.testing.assert_allclose(feats[:, F0] * 400.0, f0, rtol=0.05)
  assert (feats[:, VOICING] > 0.9).all()


def test_noise_and_silence_are_unvoiced():
  noise = np.random.default_rng(3).standard_normal(2 * SR).astype(np.float32) * 0.1
  feats = audio.frame_features(noise, SR, 60, 30.0, kind="logmel+prosody")
  assert (feats[:, F0] == 0).all() and (feats[:, VOICING] < 0.5).all()
  assert feats[:, N_MELS + 1].mean() > 0.4  # white noise crosses zero about every other sample
  silent = audio.frame_features(np.zeros(SR), SR, 30, 30.0, kind="logmel+prosody")
  assert (silent[:, F0] == 0).all() and (silent[:, VOICING] == 0).all()
  np.testing.assert_allclose(silent[:, LOG_RMS], 0.5 * np.log(1e-10), rtol=1e-6)
  np.testing.assert_allclose(silent[:, :N_MELS], np.log(1e-10), rtol=1e-6)


# ---- WAV reading and resampling ----


def _write_pcm(path, ints, width, channels, rate=SR):
  with wave.open(str(path), "wb") as f:
    f.setnchannels(channels)
    f.setsampwidth(width)
    f.setframerate(rate)
    if width == 3:
      b = np.asarray(ints, "<i4").reshape(-1).view(np.uint8).reshape(-1, 4)[:, :3]
      f.writeframes(b.tobytes())
    else:
      f.writeframes(np.asarray(ints).astype({1: "u1", 2: "<i2", 4: "<i4"}[width]).tobytes())


@pytest.mark.parametrize("width,scale,offset", [(1, 128, 128), (2, 2**15, 0), (3, 2**23, 0), (4, 2**31, 0)])
def test_read_wav_pcm_stereo_to_mono(tmp_path, width, scale, offset):
  rng = np.random.default_rng(width)
  ints = rng.integers(-scale, scale, size=(501, 2)) + offset
  path = tmp_path / "x.wav"
  _write_pcm(path, ints, width, 2, rate=22050)
  x, rate = audio.read_wav(path)
  assert rate == 22050 and x.dtype == np.float32 and x.shape == (501,)
  np.testing.assert_allclose(x, ((ints - offset) / scale).mean(axis=1), atol=1e-6)


def _riff(fmt: bytes, data: bytes) -> bytes:
  body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
  return b"RIFF" + struct.pack("<I", len(body)) + body


def test_read_wav_float_and_extensible(tmp_path):
  """What Python 3.11's `wave` refuses: IEEE float, and WAVE_FORMAT_EXTENSIBLE (ffmpeg's)."""
  samples = np.random.default_rng(4).uniform(-1, 1, 300).astype("<f4")
  fmt = struct.pack("<HHIIHH", 3, 1, 8000, 8000 * 4, 4, 32)
  (tmp_path / "f.wav").write_bytes(_riff(fmt, samples.tobytes()))
  x, rate = audio.read_wav(tmp_path / "f.wav")
  assert rate == 8000
  np.testing.assert_array_equal(x, samples)
  ints = np.random.default_rng(5).integers(-2**15, 2**15, size=(200, 2)).astype("<i2")
  guid_pcm = struct.pack("<H", 1) + bytes.fromhex("000000001000800000aa00389b71")
  fmt = struct.pack("<HHIIHHHHI", 0xFFFE, 2, SR, SR * 4, 4, 16, 22, 16, 3) + guid_pcm
  (tmp_path / "ext.wav").write_bytes(_riff(fmt, ints.tobytes()))
  x, rate = audio.read_wav(tmp_path / "ext.wav")
  assert rate == SR
  np.testing.assert_allclose(x, ints.mean(axis=1) / 2**15, atol=1e-7)


def test_read_wav_errors_name_the_file(tmp_path):
  bad = tmp_path / "corrupt.wav"
  bad.write_bytes(b"this is not a wav file at all")
  with pytest.raises(ValueError, match="corrupt.wav"):
    audio.read_wav(bad)
  truncated = tmp_path / "truncated.wav"
  truncated.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt ")
  with pytest.raises(ValueError, match="truncated.wav"):
    audio.read_wav(truncated)
  with pytest.raises(FileNotFoundError, match="missing.wav"):
    audio.read_wav(tmp_path / "missing.wav")


def test_resample_keeps_frequency_and_length():
  n = 44100 + 37
  x = _tone(440.0, n / 44100, rate=44100)[:n]
  y = audio.resample(x, 44100, SR)
  assert abs(len(y) - round(n * SR / 44100)) <= 1 and y.dtype == np.float32
  spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y))))
  assert abs(np.argmax(spectrum) * SR / len(y) - 440.0) < 2.0
  np.testing.assert_array_equal(audio.resample(x, SR, SR), x)


# ---- Features computed elsewhere ----


def test_align_external_interpolates_linearly_and_clamps():
  hop, num_frames = 0.02, 59  # frame 58 at 1.933 s: inside the features' 0 .. 1.98 s
  times = np.arange(100) * hop
  ramp = np.stack([times, 3 - 2 * times], axis=1)
  out = audio.align_external(ramp, hop, num_frames, 30.0)
  t = np.arange(num_frames) / 30.0
  assert out.shape == (num_frames, 2) and out.dtype == np.float32
  np.testing.assert_allclose(out, np.stack([t, 3 - 2 * t], axis=1), rtol=1e-6, atol=1e-6)
  # Offset features start at 0.1 s; the video runs 4 s past their end (1.98 s).
  late = audio.align_external(ramp, hop, 180, 30.0, offset_s=0.1)
  np.testing.assert_allclose(late[:4], np.tile(ramp[0], (4, 1)))
  np.testing.assert_allclose(late[10], ramp[0] + (10 / 30 - 0.1) / hop * (ramp[1] - ramp[0]), rtol=1e-5)
  np.testing.assert_allclose(late[-1], ramp[-1])
  np.testing.assert_allclose(audio.align_external(ramp[:1], hop, 3, 30.0), np.tile(ramp[:1], (3, 1)))


def test_load_external(tmp_path):
  a = np.arange(12, dtype=np.float32).reshape(4, 3)
  np.save(tmp_path / "vid.npy", a)
  np.testing.assert_array_equal(audio.load_external(tmp_path, "vid"), a)
  np.testing.assert_array_equal(audio.load_external(tmp_path, "vid_left"), a)  # source fallback
  with pytest.raises(FileNotFoundError, match="other_right.npy"):
    audio.load_external(tmp_path, "other_right")
  np.save(tmp_path / "flat.npy", np.zeros(5))
  with pytest.raises(ValueError, match="flat.npy"):
    audio.load_external(tmp_path, "flat")


# ---- On the synthetic dataset ----


def test_video_audio_features_on_synthetic(tmp_path):
  root = tmp_path / "syn"
  synthetic.generate(root, synthetic.SyntheticConfig(num_videos=4, min_frames=60, max_frames=90,
                                                     image_size=32, seed=1))
  manifest = json.loads((root / "synthetic_manifest.json").read_text())
  fps = manifest["config"]["fps"]
  feats = {}
  for video, entry in manifest["videos"].items():
    feats[video], silent = audio.video_audio_features(root, video, entry["num_frames"], fps,
                                                      kind="logmel+prosody")
    assert silent == 0  # the synthetic tracks cover their videos
    assert feats[video].shape == (entry["num_frames"], 68) and np.isfinite(feats[video]).all()
    assert feats[video][:, LOG_RMS].std() > 0  # speech turns and syllables, not a flat track
  pairs = [v[: -len("_left")] for v in feats if v.endswith("_left")]
  assert pairs
  for source in pairs:
    np.testing.assert_array_equal(feats[source + "_left"], feats[source + "_right"])
  # A track cut to 40 % of its video: the frames past its end are counted.
  video = pairs[0] + "_left"
  n = manifest["videos"][video]["num_frames"]
  wav = root / AUDIO_DIR / f"{pairs[0]}.wav"
  x, rate = audio.read_wav(wav)
  keep = int(0.4 * n / fps * rate)
  _write_pcm(wav, (x[:keep] * 32767).astype(np.int16), 2, 1, rate)
  _, silent = audio.video_audio_features(root, video, n, fps)
  assert silent == sum(k / fps >= keep / rate for k in range(n))
  (root / AUDIO_DIR / f"{pairs[0]}.wav").unlink()
  with pytest.raises(FileNotFoundError, match=f"{pairs[0]}.wav"):
    audio.video_audio_features(root, pairs[0] + "_right", 10, fps)


def test_zero_byte_wav_says_why(tmp_path):
  path = tmp_path / "empty.wav"
  path.write_bytes(b"")
  with pytest.raises(ValueError, match=r"empty.wav: not a readable WAV file \([a-z]"):
    audio.read_wav(path)
