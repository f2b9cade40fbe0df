"""Throughput benchmarks; one JSON line per result plus a readable table.

  python launch/bench.py --what=mae --preset=base --batch=8 --dtype=bfloat16
  python launch/bench.py --what=loader --batch=64   # folders vs ArrayRecord (bytes, pixels),
      # 0/1/2 workers, 64/224 px, crop on the host or the device
  python launch/bench.py --what=temporal --preset=paper
  python launch/bench.py --what=matmul        # this machine's XLA matmul GFLOP/s (the ceiling)
  python launch/bench.py --what=matmul_layouts --preset=base --batch=8   # the step's own matmuls
  python launch/bench.py --what=memory --stage=mae --preset=large --batch=256 \
      --cpu_devices=8 --remat=full                 # per-device memory of the compiled step
  python launch/bench.py --what=memory --stage=finetune --preset=huge --batch=256 \
      --topology=v5e:8x8                           # compiled by XLA:TPU on this host (libtpu)
"""

import json
import sys

from absl import app, flags

from affect_jax import hostenv

_WHAT = flags.DEFINE_enum("what", "mae", ["mae", "loader", "mae+loader", "temporal", "matmul",
                                              "matmul_layouts", "memory"], "What to time.")
_PRESET = flags.DEFINE_string("preset", "tiny", "MAE size preset (configs/mae_pretrain.py).")
_BATCH = flags.DEFINE_integer("batch", 8, "Global batch size.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 0, "Override the preset's image size.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (the median is reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s per device for the MFU "
                                  "(default: known per device kind; none for CPUs).")
_WORKERS = flags.DEFINE_list("worker_counts", ["0", "1", "2"], "--what=loader: grain worker "
                             "processes, each count timed.")
_SOURCES = flags.DEFINE_list("sources", ["folders", "tfds", "tfds_rgb"], "--what=loader: image "
                             "files, or an ArrayRecord dataset of the same files (config.data."
                             "source): their bytes, or their pixels decoded at build time.")
_AUGMENT = flags.DEFINE_list("augment", ["host", "device"], "--what=loader: where the crop-resize "
                             "and flip run (config.data.augment); 'device' times the host's part.")
_THREADS = flags.DEFINE_list("read_threads", [], "--what=loader: read/decode threads per process, "
                             "each count timed (default: the loaders').")
_LOADER_SIZES = flags.DEFINE_list("loader_image_sizes", ["64", "224"], "--what=loader: crop "
                                  "sizes (the source images are this size too).")
_STAGE = flags.DEFINE_enum("stage", "mae", ["mae", "finetune"], "--what=memory: whose step.")
_MESH = flags.DEFINE_list("mesh_shape", [], "--what=memory: ('data', 'fsdp', 'model') sizes "
                          "(default: the preset's).")
_REMAT = flags.DEFINE_enum("remat", "none", ["none", "full", "dots_saveable"],
                           "--what=memory: rematerialisation of the transformer blocks.")
_SCAN = flags.DEFINE_enum("scan_layers", "default", ["default", "true", "false"],
                          "--what=memory: blocks under nn.scan (default: the preset's).")
_ACCUM = flags.DEFINE_integer("grad_accum_steps", 1, "--what=memory: micro-batches per step.")
_TOPOLOGY = flags.DEFINE_string("topology", "", "--what=memory: compile for this TPU slice "
                                "instead (e.g. v5e:8x8, v5p:4x4x4, v6e:4x4), on this host, with "
                                "libtpu (the tpu extra); nothing runs.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "Emulate this many CPU devices (e.g. the "
                                    "memory of a 64-device mesh, per device, on one host).")
_PROFILE_DIR = flags.DEFINE_string("profile_dir", "", "--what=mae: also trace a few steps here "
                                   "and print the costliest XLA operations.")
_PER_CALL = flags.DEFINE_integer("steps_per_call", 1, "--what=mae: train steps per jitted call "
                                 "(config.steps_per_call); --steps counts calls.")


def main(argv):
  del argv
  if _CPU_DEVICES.value:
    import jax
    jax.config.update("jax_num_cpu_devices", _CPU_DEVICES.value)
  from affect_jax import bench
  from configs import common, expr_finetune, mae_pretrain

  results = []
  if "mae" in _WHAT.value.split("+"):
    results.append(bench.bench_mae(mae_pretrain.get_config(_PRESET.value), _BATCH.value,
                                   dtype=_DTYPE.value, image_size=_IMAGE_SIZE.value or None,
                                   steps=_STEPS.value, warmup=_WARMUP.value,
                                   peak_tflops=_PEAK_TFLOPS.value or None,
                                   profile_dir=_PROFILE_DIR.value or None,
                                   steps_per_call=_PER_CALL.value))
  if _WHAT.value == "temporal":
    preset = _PRESET.value if _PRESET.value in ("paper", "tiny") else "paper"
    task_configs = {task: common.get_temporal_config(task, preset)
                    for task in bench.TEMPORAL_TASKS}
    results.append(bench.bench_temporal(task_configs, dtype=_DTYPE.value, steps=_STEPS.value,
                                        warmup=_WARMUP.value))
  if _WHAT.value == "matmul":
    results.append(bench.bench_matmul())
  if _WHAT.value == "matmul_layouts":
    results.append(bench.bench_matmul_layouts(mae_pretrain.get_config(_PRESET.value),
                                              _BATCH.value, image_size=_IMAGE_SIZE.value or None,
                                              repeats=_STEPS.value))
  if _WHAT.value == "memory":
    dtype = _DTYPE.value if any(a.startswith("--dtype") for a in sys.argv) else None
    stage_config = (mae_pretrain if _STAGE.value == "mae" else expr_finetune).get_config(
        _PRESET.value)
    results.append(bench.bench_memory(stage_config, _STAGE.value, _BATCH.value, dtype=dtype,
                                      mesh_shape=[int(s) for s in _MESH.value] or None,
                                      remat=_REMAT.value, grad_accum_steps=_ACCUM.value,
                                      image_size=_IMAGE_SIZE.value or None,
                                      scan_layers={"default": None, "true": True,
                                                   "false": False}[_SCAN.value],
                                      topology=_TOPOLOGY.value or None))
  if "loader" in _WHAT.value.split("+"):
    sizes = [int(x) for x in _LOADER_SIZES.value]
    if _WHAT.value == "mae+loader":  # the loader at the step's image size
      sizes = [_IMAGE_SIZE.value or mae_pretrain.get_config(_PRESET.value).data.image_size]
    for size in sizes:
      for source in _SOURCES.value:
        items = bench.loader_inputs(source, size)
        for threads in _THREADS.value or [None]:
          for workers in _WORKERS.value:
            for where in _AUGMENT.value:
              results.append(bench.bench_loader(
                  _BATCH.value, size, worker_count=int(workers), source=source, items=items,
                  read_threads=None if threads is None else int(threads), augment=where))
  for r in results:
    print(json.dumps({k: v for k, v in r.items() if not k.endswith("_all")}))
  print()
  for r in results:
    if r["what"] == "mae_train_step":
      mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
      tf = f"{r['tflops_per_s']:.2f}" if r["tflops_per_s"] else "n/a"
      mem = f"{r['peak_memory_bytes'] / 2**30:.2f} GiB" if r["peak_memory_bytes"] else "n/a"
      print(f"MAE {r['variant']} {r['image_size']}px batch {r['batch']} {r['dtype']} on "
            f"{r['devices']}x {r['device_kind']}: {r['img_per_s']:.2f} img/s, step "
            f"{1e3 * r['step_s']:.1f} ms (median of {len(r['step_s_all'])} calls of "
            f"{r['steps_per_call']} step{'s' if r['steps_per_call'] > 1 else ''}), {tf} TFLOP/s, "
            f"MFU {mfu}, peak memory {mem}")
      for op in r.get("profile", {}).get("top", []):
        print(f"  {op['ms']:8.2f} ms/step  {op['op']:32s} {op['op_name'][-90:]}")
    elif r["what"] == "temporal":
      tf = f"{r['predict_tflops_per_s']:.2f}" if r["predict_tflops_per_s"] else "n/a"
      widths = "-".join(str(w) for w in r["tcn_channels"])
      print(f"temporal (TCN {widths}, Transformer {r['num_layers']} x {r['d_model']}) "
            f"{r['dtype']} on {r['devices']}x {r['device_kind']}: training "
            f"{r['train_frames_per_s']:.0f} frames/s (step {1e3 * r['train_step_s']:.0f} ms); "
            f"predict one {r['frames']}-frame video with VA+Expr+AU: {r['predict_s_all_heads']:.2f} s "
            f"({tf} TFLOP/s)")
    elif r["what"] == "matmul_layouts":
      print(f"MAE {r['variant']} batch {r['batch']} matmuls on {r['device_kind']} (GFLOP/s; "
            f"'x N' = layers):")
      print(f"  {'':8s} {'':9s} {'product':18s} {'sizes':30s} {'float32':>8s} "
            f"{'bf16 (ours)':>11s} {'bf16 (plain einsum)':>19s}")
      for row in r["rows"]:
        sizes = " ".join(f"{k}={v}" for k, v in row["sizes"].items())
        print(f"  {row['part']:8s} {row['name']:9s} {row['product']:18s} {sizes:30s} "
              f"{row['float32_gflops']:8.0f} {row['bfloat16_f32acc_gflops']:11.0f} "
              f"{row['bfloat16_plain_gflops']:19.0f}  x{row['count']}")
    elif r["what"] == "memory":
      head = (f"{r['stage']} {r['variant']} {r['image_size']}px batch {r['batch']} {r['dtype']} "
              f"mesh {tuple(r['mesh_shape'])} remat {r['remat']} accum {r['grad_accum_steps']} "
              f"scan {r['scan_layers']} on {r['devices']}x {r['device_kind']}: ")
      if r.get("error"):
        print(f"{head}does not fit: {r['error']}")
        continue
      peak = "" if r["peak_gib"] is None else f", peak {r['peak_gib']:.2f} GiB"
      fits = "" if r["fits"] is None else (f", {'fits' if r['fits'] else 'does not fit'} in "
                                           f"{r['device_memory_gib']} GiB")
      print(f"{head}per device {r['total_gib']:.2f} GiB (arguments {r['arguments_gib']:.2f}, "
            f"temporaries {r['temporaries_gib']:.2f}, outputs {r['outputs_gib']:.2f}, aliased "
            f"{r['aliased_gib']:.2f}){peak}{fits}; compiled in {r['compile_s']:.0f} s")
    elif r["what"] == "matmul":
      print(f"XLA matmul {r['n']}^3 on {r['device_kind']}: float32 {r['float32_gflops']:.0f} "
            f"GFLOP/s, bfloat16 operands with float32 accumulation "
            f"{r['bfloat16_f32acc_gflops']:.0f} GFLOP/s")
    else:
      print(f"grain loader {r['source']:8s} {r['image_size']:3d}px crop on {r['augment']:6s} batch "
            f"{r['batch']} workers {r['worker_count']} threads {r['read_threads']:2d}: "
            f"{r['img_per_s']:7.1f} img/s, {r['img_per_cpu_s']:7.1f} img per CPU-second "
            f"(medians of {len(r['img_per_s_all'])})")


if __name__ == "__main__":
  hostenv.configure()
  app.run(main)
