"""The benchmark suite: FLOP accounting, the measured matmul ceiling, peers, and one runner per section.

    .venv/bin/python -m attn_jax.bench all --out experiments/results      # or: attn-jax bench all

Sections (each a module, each writing ``<name>.json`` + ``<name>.md`` + ``<name>.png`` under ``--out``):
``attention`` (``attn_jax.bench.attention``), ``train`` (``training``), ``decode`` (``decoding``), ``compile``
(``compilation``), ``scaling`` and ``pipeline``. Everything a section compares is measured side by side in
one run; on a CPU read the ratios, not the absolute times. See ``attn_jax.bench.cli`` for the options.

Submodules are not imported here, so ``python -m attn_jax.bench.scaling`` (a child process of the scaling
section) starts without importing itself twice.
"""
