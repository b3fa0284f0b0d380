"""The RNN encoder-decoder without attention (Cho et al. 2014; Sutskever et al. 2014's reversed source) English ->
German on the Ding sentences, on a 2-core CPU: the whole source squeezed into one vector, beside RNNsearch
(experiments/rnnsearch_ding_en_de.py) and the Transformer (experiments/ding_en_de.py) at equal wall-clock budgets.

    attn-jax train --config experiments/rnn_encdec_ding_en_de.py --workdir runs/families/rnn_encdec
    attn-jax train --config experiments/rnn_encdec_ding_en_de.py:minutes=20,forward --workdir runs/rnn_encdec_fwd
    attn-jax bench families --runs runs/families/transformer runs/families/rnnsearch runs/families/rnn_encdec

The same GRU sizes, vocabulary, optimiser and batches as experiments/rnnsearch_ding_en_de.py (a 256-unit
encoder, whose last state becomes the 256-wide summary c, a 256-unit decoder, 128-wide embeddings, maxout 128),
so the two differ only in what the decoder sees. The source is read backwards by default, Sutskever et al.'s
trick that gives the first target words short paths to the source words they depend on (``forward``: Cho et
al.'s reading order). 20 minutes of training, then beam search on the test split: under 25 minutes in all; a
checkpoint every 100 steps, all kept, for ``attn-jax bench families``.

Not tuned on this machine (see experiments/rnnsearch_ding_en_de.py). On the copy task this family needs far
more steps than RNNsearch as sequences grow (tests/test_families.py), the fixed-length bottleneck Bahdanau et al.
measured. Measured (2026-12-02, idle 2-core AMD EPYC, experiments/results/families.md): 2,436 steps in 20
minutes at 3.1k target tokens/s, validation perplexity 57.5, test sacreBLEU 1.58 (0.87 at 5 minutes, 0.75 at 10),
against RNNsearch's 2.17 and the Transformer's 5.14.
"""

from attn_jax import defaults
from attn_jax.config import parse_arg


def get_config(arg=None):
    args = parse_arg(arg, minutes=20.0, forward=False)
    c = defaults.base_config()
    c.data = defaults.data_config(
        name="ding_en_de", vocab_size=4000, max_length=48, tokens_per_batch=2048, eval_tokens_per_batch=2048
    )
    c.model = defaults.model_config(family="rnn_encdec", d_model=256, max_len=128, dropout_rate=0.3)
    c.model.rnn.embed_dim = 128  # M: word embeddings
    c.model.rnn.encoder_dim = 256  # E: the encoder state and the summary c
    c.model.rnn.maxout_dim = 128  # R: maxout units of the readout
    c.model.rnn.reverse_source = not args.forward  # Sutskever et al.'s reversed source (False: Cho et al.)
    c.train.steps = 1_000_000  # the time budget ends training first
    c.train.time_budget_minutes = args.minutes  # wall-clock budget of the comparison
    c.train.warmup_steps = 300  # short warm-up for a short run
    c.train.learning_rate_scale = 0.3  # peak 0.3 * 256^-0.5 * 300^-0.5 = 1.1e-3
    c.train.b2 = 0.999  # Adam's second-moment decay (the paper's 0.98 makes small recurrent losses jump)
    c.train.grad_clip_norm = 1.0  # gradients rescaled to norm 1, as for RNNsearch
    c.train.log_every = 50  # steps between logged training metrics
    c.train.eval_every = 1_000_000  # no mid-run BLEU: the final evaluation scores everything
    c.train.checkpoint_every = 100  # fine-grained, for the 5- and 10-minute scores of `attn-jax bench families`
    c.train.keep_checkpoints = 1000  # keep them all (about 40 MB each)
    c.eval.batch_size = 128  # sentences per decoding batch
    return c
