"""``python -m attn_jax`` is the ``attn-jax`` command."""

from attn_jax.main import run

run()
