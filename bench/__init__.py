"""Benchmarks of linear + cross entropy: every method's time, peak memory and gradient error.

``python -m bench --out DIR`` measures on the GPU and writes JSON files to ``DIR``;
``python -m bench --smoke --out DIR`` runs the same code on the CPU at tiny sizes (CI).
``bench.report`` and ``bench.plots`` read those files back for notebook 08.
"""
