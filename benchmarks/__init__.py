"""Benchmarks of speed, memory and scale (not tests; ``memoe bench``): each prints its figures and
returns them. Outside the library: they use memoe, memoe does not use them.

``run_bench(quick=...)`` measures, in one process on one machine:
  edit throughput (edits/s for 10 / 100 / 1,000 edits), seconds per training step with and without
  the cache of the layers below l, FT-M's step in the same run, evaluation throughput
  (teacher-forced and generation), peak RSS per phase, adapter size against the base model,
  achieved FLOP/s of the training step against a plain matmul of the same shapes, and a sequential
  scale study (time per round, Rel / Gen / Loc over rounds).

``benchmarks/speed.py`` (``run_bench``, ``step_time``), ``benchmarks/roofline.py`` (FLOPs, the matmul
replay), ``benchmarks/scale.py`` (``sequential_scale``, ``flatness``), ``benchmarks/gauge.py`` (the
scale study's host-speed gauge), ``benchmarks/common.py`` (``StepTimes``: step times through ``on_step``).
"""
