"""``python -m attn_jax.bench SECTION [options]``: the same as ``attn-jax bench SECTION [options]``."""

import sys

from attn_jax.bench.cli import main

sys.exit(main())
