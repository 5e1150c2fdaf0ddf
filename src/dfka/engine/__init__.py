"""The engine: how a stage trains, whatever the method computes.

* :mod:`~dfka.engine.loop`: one training-loop contract (budgets in steps or seconds, progress, metric
  callbacks, checkpoint calls, NaN stops);
* :mod:`~dfka.engine.checkpoint`: atomic, verified checkpoints and resume positions (local or S3);
* :mod:`~dfka.engine.fast`: the fast compute path (folded teachers, GEMM thin convs, fused Adam), chosen
  per object through :class:`~dfka.engine.fast.ComputePath`;
* :mod:`~dfka.engine.probe`: the accuracy-vs-time probe the benchmarks hang on a loop.

It imports nothing of the method (:mod:`dfka.amalgamation`), the stages, the benchmarks or the ops
tooling (``tests/test_import_rules.py``).
"""
