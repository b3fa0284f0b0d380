"""One pure train step on 1 device, under pmap over 8, and under sharded jit on data=8 and data x fsdp x tensor.

All strategies go through ``attn_jax.loop.compile_steps``, the code ``attn-jax train`` runs. Dropout is off so
every strategy computes the same function; only the order of the cross-device sums differs.
"""

import functools

import jax
import numpy as np
import pytest

from attn_jax import checkpoint as ckpt_lib
from attn_jax import config as config_lib
from attn_jax import loop, parallel
from attn_jax.config import load_experiment
from attn_jax.decoding import beam_search, greedy_decode
from attn_jax.evaluate import translate_ids
from attn_jax.model import init_transformer
from attn_jax.optim import make_optimizer, rsqrt_warmup_schedule
from attn_jax.train import TrainState, init_train_state

STEPS = 20
BATCH, LENGTH, VOCAB = 16, 8, 32

MESHES = {
    "single": ("jit", {"data": 1, "fsdp": 1, "tensor": 1}),
    "pmap8": ("pmap", {"data": 8, "fsdp": 1, "tensor": 1}),
    "data8": ("jit", {"data": 8, "fsdp": 1, "tensor": 1}),
    "data2_fsdp2_tensor2": ("jit", {"data": 2, "fsdp": 2, "tensor": 2}),
}


def _config(strategy: str):
    # d_model, heads, d_ff and the vocabulary all divide by 2, so fsdp and tensor really shard parameters.
    return load_experiment(
        "experiments/tiny.py",
        ["model.dropout_rate=0.0", f"parallel.strategy={strategy}", "model.d_model=32", "model.num_heads=4"],
    )


def _batches():
    rng = np.random.default_rng(0)
    for _ in range(STEPS + 1):
        tokens = rng.integers(4, VOCAB, (BATCH, LENGTH), dtype=np.int32)
        tokens[:, -2:] = 0  # some padding, so the token-count normalisation is exercised
        bos = np.full((BATCH, 1), 2, np.int32)
        yield {"inputs": tokens, "targets_in": np.concatenate([bos, tokens[:, :-1]], 1), "targets_out": tokens}


def _setup(strategy: str, mesh_shape: dict):
    config = _config(strategy)
    devices = jax.devices()[: int(np.prod(list(mesh_shape.values())))]
    mesh = parallel.make_mesh(mesh_shape, devices=devices)
    model_config = config_lib.model_config(config, vocab_size=VOCAB)
    # Peak 1.1e-3, the paper's for base (tiny's own 0.056 would let Adam blow float32 rounding up to 1e-4).
    tx = make_optimizer(rsqrt_warmup_schedule(model_config.d_model, config.train.warmup_steps, scale=0.02))
    if strategy == "pmap":
        assert jax.local_device_count() == len(devices) == 8
    steps = loop.compile_steps(config, model_config, tx, mesh)
    state = init_train_state(jax.random.key(0), model_config, tx)
    return steps, steps.put_state(state), mesh, model_config, tx


def _as_dict(state: TrainState) -> dict:
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


def _train(name: str):
    strategy, mesh_shape = MESHES[name]
    steps, state, *_ = _setup(strategy, mesh_shape)
    losses = []
    for batch, _ in zip(_batches(), range(STEPS), strict=False):
        state, metrics = steps.train(state, steps.put_batch(batch), jax.random.key(1))
        losses.append(float(metrics["loss"]) / float(metrics["weight"]))
    return np.asarray(losses), jax.device_get(steps.get_state(state).params)


@pytest.fixture(scope="module")
def single_device_run():
    return _train("single")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pmap8", "data8", "data2_fsdp2_tensor2"])
def test_twenty_steps_agree_with_one_device(name, single_device_run):
    expected_losses, expected_params = single_device_run
    losses, params = _train(name)
    assert expected_losses[-1] < expected_losses[0]  # it trained
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
    flat_expected = jax.tree_util.tree_leaves_with_path(expected_params)
    flat = jax.tree.leaves(params)
    assert len(flat) == len(flat_expected)
    for (path, want), got in zip(flat_expected, flat, strict=True):
        if jax.tree_util.keystr(path).endswith("['b_k']"):
            # The key bias adds q.b_k to every logit of a row, which softmax ignores: its exact gradient is 0,
            # so Adam turns each strategy's rounding noise into full-size steps of random sign.
            continue
        # Relative to the leaf's scale: Adam moves near-zero entries by ~lr whatever their gradient's size.
        scale = float(np.max(np.abs(want)))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))


def test_tensor_and_fsdp_axes_really_shard_parameters():
    _, state, *_ = _setup("jit", MESHES["data2_fsdp2_tensor2"][1])
    specs = {jax.tree_util.keystr(p): leaf.sharding.spec for p, leaf in jax.tree_util.tree_leaves_with_path(state)}
    w_1 = next(spec for key, spec in specs.items() if key.endswith("['w_1']"))
    assert "tensor" in tuple(w_1) and "fsdp" in tuple(w_1), w_1


@pytest.mark.slow
def test_checkpoint_moves_between_meshes_bitwise_and_continues_with_the_same_loss(tmp_path):
    """data=8 -> data=2 x tensor=4 -> 1 device: identical parameters, identical next-step loss."""
    batches = list(_batches())
    steps, state, _, model_config, tx = _setup("jit", {"data": 8, "fsdp": 1, "tensor": 1})
    for batch in batches[:3]:
        state, _ = steps.train(state, steps.put_batch(batch), jax.random.key(1))
    saved_params = jax.device_get(state.params)
    with ckpt_lib.Checkpointer(tmp_path / "a") as checkpointer:
        checkpointer.save(3, _as_dict(state), force=True)

    abstract = jax.eval_shape(lambda: init_train_state(jax.random.key(0), model_config, tx))
    next_losses = []
    for mesh_shape in ({"data": 2, "fsdp": 1, "tensor": 4}, {"data": 1, "fsdp": 1, "tensor": 1}):
        devices = jax.devices()[: int(np.prod(list(mesh_shape.values())))]
        mesh = parallel.make_mesh(mesh_shape, devices=devices)
        shardings = parallel.state_shardings(abstract, mesh, tx)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        with ckpt_lib.Checkpointer(tmp_path / "a") as checkpointer:
            restored = TrainState(**checkpointer.restore(_as_dict(target)).state)
        for got, want in zip(jax.tree.leaves(jax.device_get(restored.params)), jax.tree.leaves(saved_params),
                             strict=True):  # fmt: skip
            np.testing.assert_array_equal(got, want)
        assert all(leaf.sharding.mesh.shape == mesh.shape for leaf in jax.tree.leaves(restored.params))
        mesh_steps = loop.compile_steps(_config("jit"), model_config, tx, mesh)
        _, metrics = mesh_steps.train(restored, mesh_steps.put_batch(batches[3]), jax.random.key(1))
        next_losses.append(float(metrics["loss"]))
    _, metrics = steps.train(state, steps.put_batch(batches[3]), jax.random.key(1))
    np.testing.assert_allclose(next_losses, [float(metrics["loss"])] * 2, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Decoding on the mesh
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mesh_shape", [{"data": 8}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_greedy_and_beam_search_on_the_mesh_give_the_single_device_tokens(mesh_shape):
    model_config = config_lib.model_config(_config("jit"), vocab_size=VOCAB)
    params = init_transformer(jax.random.key(3), model_config)
    mesh = parallel.make_mesh(mesh_shape)
    sharded_params = jax.device_put(params, parallel.param_shardings(params, mesh))
    sources = next(_batches())["inputs"]
    sharded_sources = parallel.put_replicated_host_batch(sources, mesh)
    assert len(sharded_sources.sharding.device_set) == 8 and not sharded_sources.sharding.is_fully_replicated
    for decode in (
        jax.jit(functools.partial(greedy_decode, config=model_config, max_len=10)),
        jax.jit(lambda p, s: beam_search(p, s, config=model_config, beam_size=3, alpha=0.6, max_len=10)[0]),
    ):
        expected = np.asarray(decode(params, sources))
        on_mesh = decode(sharded_params, sharded_sources)
        assert not on_mesh.sharding.is_fully_replicated  # the batch stayed split: no device decoded it all
        np.testing.assert_array_equal(parallel.fetch_global(on_mesh), expected)


def test_translate_ids_on_the_mesh_matches_one_device():
    model_config = config_lib.model_config(_config("jit"), vocab_size=VOCAB)
    params = init_transformer(jax.random.key(4), model_config)
    mesh = parallel.make_mesh({"data": 4, "tensor": 2})
    sources = [np.append(row[: 3 + i % 5], 1).astype(np.int32) for i, row in enumerate(next(_batches())["inputs"])]
    kwargs = dict(model_config=model_config, beam_size=2, extra_length=4, batch_size=8)
    expected = translate_ids(params, sources, **kwargs)
    got = translate_ids(jax.device_put(params, parallel.param_shardings(params, mesh)), sources, **kwargs,
                        batch_multiple=parallel.batch_divisor(mesh), mesh=mesh)  # fmt: skip
    assert [o.tolist() for o in got] == [o.tolist() for o in expected]
