"""WMT 2014 English -> German, exactly as the paper trains it (§5, Table 3).

    attn-jax train --config experiments/wmt14_en_de.py:size=base --workdir runs/wmt14_base
    attn-jax train --config experiments/wmt14_en_de.py:size=big --workdir runs/wmt14_big
    attn-jax average --workdir runs/wmt14_base --last 5     # the paper averages the last 5 (base) / 20 (big)

Shared 37k-token BPE SentencePiece vocabulary, batches of ~25k source + ~25k target tokens, Adam
(0.9, 0.98, 1e-9) with warm-up 4000 and the rsqrt schedule, P_drop 0.1 (base) / 0.3 (big), label
smoothing 0.1, beam 4, length penalty 0.6, maximum output length input + 50. Base: 100k steps, big: 300k.
Expected (paper, newstest2014): 27.3 BLEU (base), 28.4 BLEU (big); 12 h (base) / 3.5 days (big) on 8 P100.
The data comes from TFDS's wmt14_translate/de-en builder (downloads ~1.5 GB on first use).
``runlocal`` shrinks batches and steps for a smoke test on one machine.
"""

from attn_jax import defaults
from attn_jax.config import ConfigError, parse_arg


def get_config(arg=None):
    args = parse_arg(arg, size="base", runlocal=False)
    if args.size not in ("base", "big"):
        raise ConfigError(f"experiment argument size must be 'base' or 'big', got {args.size!r}")
    big = args.size == "big"
    c = defaults.base_config()
    c.data = defaults.data_config(
        name="wmt14_translate/de-en", vocab_size=37000, max_length=256, tokens_per_batch=25_000,
        eval_tokens_per_batch=8192, num_threads=8,
    )  # fmt: skip
    c.model = defaults.model_config(
        d_model=1024 if big else 512, num_heads=16 if big else 8, d_ff=4096 if big else 2048,
        dropout_rate=0.3 if big else 0.1, max_len=512,
    )  # fmt: skip
    c.train.steps = 300_000 if big else 100_000  # paper: 100k (base), 300k (big)
    c.train.keep_checkpoints = 20 if big else 5  # the checkpoints that get averaged
    c.train.checkpoint_every = 1000  # paper: every 10 minutes
    c.eval.bleu_examples = 1000  # newstest2013 subset during training
    if args.runlocal:
        c.data.tokens_per_batch = 2048
        c.train.steps = 200
        c.train.eval_every = 100
        c.train.checkpoint_every = 100
        c.eval.bleu_examples = 32
    return c
