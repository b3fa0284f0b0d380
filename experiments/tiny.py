"""A CPU-sized run of the whole pipeline on the copy task, for tests and `make smoke` (seconds).

attn-jax train --config experiments/tiny.py --workdir /tmp/tiny
"""

from attn_jax import defaults


def get_config(arg=None):
    c = defaults.base_config()
    c.data = defaults.data_config(name="copy", max_length=16, tokens_per_batch=256, eval_tokens_per_batch=256)
    c.data.copy = defaults.copy_task_config(train_examples=512, eval_examples=16)
    c.model = defaults.model_config(
        d_model=32, num_heads=2, d_ff=64, num_encoder_layers=1, num_decoder_layers=1, max_len=32, dropout_rate=0.1
    )
    c.train.steps = 20
    c.train.warmup_steps = 10
    c.train.log_every = 5
    c.train.eval_every = 10
    c.train.checkpoint_every = 10
    c.eval.beam_size = 2
    c.eval.extra_length = 4
    c.eval.attention_plots = 0
    c.eval.num_samples = 2
    return c
