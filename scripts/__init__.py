"""Entry points: ``train``, ``evaluate``, ``plot``, benchmarks and research checks.

Each is a script (``python scripts/train.py ...``) and a module with ``main(argv) -> int``;
``pip install`` adds the ``imagine-rl`` command (``imagine_rl.scripts.cli``), which runs the
same mains.
"""
