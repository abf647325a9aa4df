"""NeuMF (mf-solver = "neumf"): the model, its user step, what leaves a merchant, and DP-SGD over it.

- The torch module (shared/neumf.py) and the numpy scoring (shared/neumf_arrays.py) compute the
  same scores; every global parameter learns; the public content embedding is a buffer that no
  optimizer and no DP noise moves; the global arrays round-trip and are checked by shape.
- The user step (client/user_step.NeuMFUserStep) fits each user's embeddings to their own rows:
  it lowers their objective, and a user's result does not depend on who else is present.
- A training reply carries exactly the NeuMF global parameters: no user embedding, no user id.
- DP-SGD with Opacus (hooks and ghost clipping) over the whole network: one user moves the
  clipped gradient sum by their own clipped gradient, never by more than max-grad-norm; the
  epochs run under "auto" with Opacus' clipping (the fused closed form is MF's only).
- End to end, the run's own solver (simulations/baselines.centralized) improves NDCG@10.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import client.privacy.dp_sgd_epochs as dp_sgd_epochs
from client.node_state import NodeState
from client.privacy.dp_sgd_epochs import DPSGDSettings, private_ad_epochs, resolve_grad_sample_mode
from client.solvers.sgd_rows import UserRows, build_user_rows
from client.user_step import NeuMFUserStep, parse_user_step
from shared.config import ConfigError, RunConfig
from shared.data.schema import InteractionLog
from shared.data.sources import load_dataset
from shared.data.split import UserSplit, leave_last_out
from shared.data.synthetic import SyntheticSpec, generate
from shared.flower_internals import wire_bytes
from shared.neumf import NeuMF, solve_neumf_users
from shared.neumf_arrays import init_neumf_arrays, layer_bias, layer_weight, neumf_shapes
from shared.params import check_global_arrays, global_shapes, init_global_arrays, initial_model, score_all, stored_shapes, user_dim
from shared.wire import (
    AD_BIAS,
    AD_FACTORS,
    NEUMF_CONTENT,
    NEUMF_CONTENT_GMF,
    NEUMF_CONTENT_MLP,
    NEUMF_GMF,
    NEUMF_MLP,
    NEUMF_OUTPUT_BIAS,
    NEUMF_OUTPUT_WEIGHT,
    Arrays,
    from_array_record,
)
from tests.clipping_probe import clipped_sums, user_gradient
from tests.conftest import client_call, simulated_node, small_run_config

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*Secure RNG.*", "ignore:.*Full backward hook.*", "ignore:Optimal order is the smallest alpha:UserWarning",
)

DIM = 4
LAYERS = (8, 4)
CONTENT_DIM = 6
MODES = ["hooks", "ghost"]


@pytest.fixture(autouse=True, scope="module")
def single_thread() -> Iterator[None]:
    """Tiny models: intra-op threads only add overhead (and float results stay the same run to run)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass(frozen=True)
class World:
    log: InteractionLog
    num_ads: int
    split: UserSplit
    rows: UserRows


@pytest.fixture(scope="module")
def world() -> World:
    dataset = generate(SyntheticSpec(users=40, ads=30, merchants=1, seed=3))[0]
    split = leave_last_out(dataset.log, len(dataset.catalog))
    rows = build_user_rows(split, np.random.default_rng(0), negatives=2, max_positives=5)
    return World(dataset.log, len(dataset.catalog), split, rows)


def neumf_arrays(num_ads: int, content: bool, seed: int = 0, layers: tuple[int, ...] = LAYERS) -> Arrays:
    """NeuMF's arrays with every part away from its initial zeros (ad biases, content projections),
    so each term of the score shows up in a comparison."""
    rng = np.random.default_rng(seed + 100)
    embedding = rng.normal(size=(num_ads, CONTENT_DIM)).astype(np.float32) if content else None
    arrays = init_neumf_arrays(num_ads, DIM, layers, seed, embedding)
    arrays[NEUMF_GMF] = arrays[NEUMF_GMF] * 5
    arrays[NEUMF_MLP] = arrays[NEUMF_MLP] * 5
    arrays[AD_BIAS] = rng.normal(0.0, 0.5, num_ads).astype(np.float32)
    if content:
        arrays[NEUMF_CONTENT_GMF] = rng.normal(0.0, 0.3, (DIM, CONTENT_DIM)).astype(np.float32)
        arrays[NEUMF_CONTENT_MLP] = rng.normal(0.0, 0.3, (DIM, CONTENT_DIM)).astype(np.float32)
    return arrays


def user_vectors(num_users: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(num_users, 2 * DIM, generator=torch.Generator().manual_seed(seed))


def parameter_keys(content: bool) -> set[str]:
    """The global arrays that are trained (all but the public content embedding)."""
    keys = {NEUMF_GMF, NEUMF_MLP, AD_BIAS, NEUMF_OUTPUT_WEIGHT, NEUMF_OUTPUT_BIAS}
    keys |= {name(i) for i in range(len(LAYERS)) for name in (layer_weight, layer_bias)}
    return keys | ({NEUMF_CONTENT_GMF, NEUMF_CONTENT_MLP} if content else set())


def global_shapes_of(arrays: Arrays) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in arrays.items()}


# ====================================================================== the model
@pytest.mark.parametrize("content", [False, True])
def test_forward_gives_one_logit_per_row_and_every_parameter_learns(world: World, content: bool) -> None:
    arrays = neumf_arrays(world.num_ads, content)
    model = NeuMF.from_arrays(arrays)
    batch = torch.arange(10)
    users = user_vectors(world.split.num_users)[batch]
    ads, labels, mask = world.rows.ads[batch], world.rows.labels[batch], world.rows.mask[batch]
    logits = model(users, ads)
    assert logits.shape == ads.shape == (10, ads.shape[1])
    assert torch.isfinite(logits).all()

    loss = (F.binary_cross_entropy_with_logits(logits, labels, reduction="none") * mask).sum()
    loss.backward()
    # the module's parameters are exactly the trained global arrays, and each receives a gradient
    assert len(list(model.parameters())) == len(parameter_keys(content))
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert float(parameter.grad.abs().sum()) > 0, f"{name} receives no gradient"
    # the user vectors are an input, never a parameter
    assert all(p.shape[0] != world.split.num_users for p in model.parameters())

    if content:
        # the content embedding: a buffer, not a parameter, and no gradient reaches it
        assert NEUMF_CONTENT not in dict(model.named_parameters())
        assert "ad_content" in dict(model.named_buffers())
        assert not model.ad_content.requires_grad and model.ad_content.grad is None
        np.testing.assert_array_equal(model.ad_content.numpy(), arrays[NEUMF_CONTENT])
    else:
        assert not list(model.buffers())


@pytest.mark.parametrize("content", [False, True])
def test_an_optimizer_moves_every_parameter_and_never_the_content_embedding(world: World, content: bool) -> None:
    arrays = neumf_arrays(world.num_ads, content)
    model = NeuMF.from_arrays(arrays)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05, weight_decay=0.1)
    users = user_vectors(world.split.num_users)
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        logits = model(users, world.rows.ads)
        loss = (F.binary_cross_entropy_with_logits(logits, world.rows.labels, reduction="none") * world.rows.mask).sum()
        loss.backward()
        optimizer.step()
    after = model.get_arrays()
    assert set(after) == set(arrays)
    for key in parameter_keys(content):
        assert not np.array_equal(after[key], arrays[key]), f"{key} did not move"
    if content:
        np.testing.assert_array_equal(after[NEUMF_CONTENT], arrays[NEUMF_CONTENT])


@pytest.mark.parametrize("layers", [(8,), LAYERS, (16, 8, 4)])
@pytest.mark.parametrize("content", [False, True])
def test_numpy_scores_equal_the_torch_forward(world: World, content: bool, layers: tuple[int, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    """score_all (no torch: the server, the evaluation, serving) folds the first MLP layer into
    per-user and per-ad terms and scores in chunks of users: the same scores as the module."""
    import shared.neumf_arrays

    arrays = neumf_arrays(world.num_ads, content, seed=5, layers=layers)
    users = user_vectors(7, seed=9)
    expected = NeuMF.from_arrays(arrays)(users, torch.arange(world.num_ads).expand(len(users), -1)).detach().numpy()
    scores = score_all(users.numpy(), arrays)
    assert scores.shape == (7, world.num_ads)
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)
    # several chunks, the last one short
    monkeypatch.setattr(shared.neumf_arrays, "SCORE_CHUNK_FLOATS", 2 * world.num_ads * layers[0])
    np.testing.assert_allclose(score_all(users.numpy(), arrays), expected, rtol=1e-5, atol=1e-5)
    # float64 user vectors (as a merchant may store them) score the same
    np.testing.assert_allclose(score_all(users.numpy().astype(np.float64), arrays), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("content", [False, True])
def test_arrays_round_trip_through_the_module(world: World, content: bool) -> None:
    arrays = neumf_arrays(world.num_ads, content)
    model = NeuMF.from_arrays(arrays)
    back = model.get_arrays()
    assert set(back) == set(arrays)
    for key in arrays:
        assert back[key].dtype == np.float32
        np.testing.assert_array_equal(back[key], arrays[key], err_msg=key)
    # get_arrays copies: changing the model leaves them as they were
    with torch.no_grad():
        model.ad_gmf.weight.add_(1.0)
    np.testing.assert_array_equal(back[NEUMF_GMF], arrays[NEUMF_GMF])
    # a rebuilt module scores as the original did
    users = user_vectors(5)
    ads = world.rows.ads[:5]
    original = NeuMF.from_arrays(arrays)
    torch.testing.assert_close(NeuMF.from_arrays(original.get_arrays())(users, ads), original(users, ads), rtol=0, atol=0)
    # set_arrays refuses arrays of another shape or kind
    with pytest.raises(ValueError, match="shape"):
        original.set_arrays({**arrays, NEUMF_GMF: arrays[NEUMF_GMF][:, :-1]})
    with pytest.raises(ValueError, match="exactly"):
        original.set_arrays(init_global_arrays(world.num_ads, DIM, seed=0))


@pytest.mark.parametrize("content", [False, True])
def test_global_shapes_check_the_initial_model(content: bool) -> None:
    cfg = RunConfig(mf_solver="neumf", factors=DIM, neumf_layers="8,4", neumf_content=content, content_dim=CONTENT_DIM, seed=3)
    dataset = generate(SyntheticSpec(users=20, ads=25, merchants=1, seed=3))[0]
    num_ads = len(dataset.catalog)
    shapes = global_shapes(cfg, num_ads)
    assert shapes == neumf_shapes(num_ads, DIM, LAYERS, CONTENT_DIM if content else 0)
    assert (NEUMF_CONTENT in shapes) == content
    arrays = initial_model(cfg, dataset.catalog)
    check_global_arrays(arrays, shapes)
    assert stored_shapes(arrays) == shapes and user_dim(arrays) == 2 * DIM
    assert all(value.dtype == np.float32 for value in arrays.values())
    np.testing.assert_array_equal(initial_model(cfg, dataset.catalog)[NEUMF_GMF], arrays[NEUMF_GMF])  # seeded
    if content:
        assert np.abs(arrays[NEUMF_CONTENT]).sum() > 0  # the catalog's content embedding, sent with the model
        assert not arrays[NEUMF_CONTENT_GMF].any() and not arrays[NEUMF_CONTENT_MLP].any()  # starts as plain NeuMF
    NeuMF.from_arrays(arrays)  # the module takes them

    for key in shapes:
        with pytest.raises(ValueError, match="exactly"):
            check_global_arrays({k: v for k, v in arrays.items() if k != key}, shapes)
        wrong = np.zeros(tuple(n + 1 for n in shapes[key]), dtype=np.float32)
        with pytest.raises(ValueError, match=f"{key} has shape"):
            check_global_arrays({**arrays, key: wrong}, shapes)
    with pytest.raises(ValueError, match="exactly"):
        check_global_arrays({**arrays, "user_factors": np.zeros((3, 2 * DIM), dtype=np.float32)}, shapes)
    with pytest.raises(ValueError, match="non-finite"):
        check_global_arrays({**arrays, NEUMF_MLP: np.full(shapes[NEUMF_MLP], np.nan, dtype=np.float32)}, shapes)
    # the other model's arrays, or this model with the other content setting, are refused
    with pytest.raises(ValueError, match="exactly"):
        check_global_arrays(init_global_arrays(num_ads, DIM, seed=0), shapes)
    with pytest.raises(ValueError, match="exactly"):
        check_global_arrays(arrays, global_shapes(cfg.with_values(neumf_content=not content), num_ads))
    with pytest.raises(ValueError, match="exactly"):
        check_global_arrays(arrays, global_shapes(cfg.with_values(mf_solver="sgd"), num_ads))
    # MF's shapes are unchanged by NeuMF's settings
    assert global_shapes(cfg.with_values(mf_solver="als"), num_ads) == {AD_FACTORS: (num_ads, DIM), AD_BIAS: (num_ads,)}


# ====================================================================== the user step
def _objective(model: NeuMF, vectors: torch.Tensor, rows: UserRows, l2: float) -> torch.Tensor:
    """Per-user sum over their rows of BCE + l2/2 ||p_u||^2, through the module's own forward."""
    with torch.no_grad():
        logits = model(vectors, rows.ads)
        data = (F.binary_cross_entropy_with_logits(logits, rows.labels, reduction="none") * rows.mask).sum(dim=1)
        return data + 0.5 * l2 * vectors.pow(2).sum(dim=1)


def test_user_step_lowers_each_users_objective(world: World) -> None:
    arrays = neumf_arrays(world.num_ads, content=True)
    step = NeuMFUserStep(user_l2=1.0, negatives=2, steps=40, learning_rate=0.05)
    vectors = step.fit(world.split, arrays, np.random.default_rng(11))
    assert vectors.shape == (world.split.num_users, 2 * DIM) and vectors.dtype == np.float32
    assert np.isfinite(vectors).all()
    # the rows it fitted: build_user_rows draws one number from the generator, whoever the users are
    rows = build_user_rows(world.split, np.random.default_rng(11), step.negatives, max_positives=None)
    model = NeuMF.from_arrays(arrays)
    fitted = _objective(model, torch.as_tensor(vectors), rows, step.user_l2)
    start = _objective(model, torch.zeros(world.split.num_users, 2 * DIM), rows, step.user_l2)
    assert bool((fitted < start).all()), f"{int((fitted >= start).sum())} users' objective did not go down"
    # and it gets (nearly) all the way down: within 5% of the gain of a fit ten times as long
    longer = step.model_copy(update={"steps": 400}).fit(world.split, arrays, np.random.default_rng(11))
    best = _objective(model, torch.as_tensor(longer), rows, step.user_l2)
    assert float(fitted.sum() - best.sum()) <= 0.05 * float(start.sum() - best.sum())
    # a warm start from the fit goes further down, not back
    again = step.fit(world.split, arrays, np.random.default_rng(11), init=vectors)
    assert float(_objective(model, torch.as_tensor(again), rows, step.user_l2).sum()) <= float(fitted.sum()) * (1 + 1e-6)
    # the record round-trips (serving folds users in with it)
    assert parse_user_step(step.model_dump_json()) == step
    cfg = RunConfig(mf_solver="neumf", neumf_user_steps=7, neumf_user_lr=0.2, user_l2=3.0, negatives=5)
    assert NeuMFUserStep.from_config(cfg) == NeuMFUserStep(user_l2=3.0, negatives=5, steps=7, learning_rate=0.2)


def test_user_step_agrees_with_the_module_gradient(world: World) -> None:
    """solve_neumf_users folds the first layer; its objective's gradient is the module's."""
    arrays = neumf_arrays(world.num_ads, content=True)
    model = NeuMF.from_arrays(arrays)
    rows = world.rows
    user, column = torch.nonzero(rows.mask, as_tuple=True)
    start = user_vectors(world.split.num_users, seed=4)
    # one Adam step of learning rate lr moves each coordinate by ~lr x sign(gradient)
    moved = solve_neumf_users(model, user, rows.ads[user, column], rows.labels[user, column], world.split.num_users,
                              l2=1.0, steps=1, learning_rate=1e-3, init=start)
    p = start.clone().requires_grad_(True)
    logits = model(p, rows.ads)
    loss = (F.binary_cross_entropy_with_logits(logits, rows.labels, reduction="none") * rows.mask).sum() + 0.5 * p.pow(2).sum()
    loss.backward()
    assert p.grad is not None
    significant = p.grad.abs() > 1e-3
    assert significant.float().mean() > 0.5
    torch.testing.assert_close(torch.sign(start - moved)[significant], torch.sign(p.grad)[significant])
    # and the model's parameters were not touched
    for key, value in model.get_arrays().items():
        np.testing.assert_array_equal(value, arrays[key], err_msg=key)


def _without(world: World, victim: str) -> UserSplit:
    rows = np.flatnonzero(world.log.user.astype(str) != victim)
    return leave_last_out(world.log.subset(rows), world.num_ads)


def test_a_users_embeddings_do_not_depend_on_the_other_users(world: World) -> None:
    arrays = neumf_arrays(world.num_ads, content=True)
    step = NeuMFUserStep(user_l2=1.0, negatives=2, steps=30, learning_rate=0.05)
    split = world.split
    full = step.fit(split, arrays, np.random.default_rng(11))
    busiest = int(np.argmax(split.positive_counts()))
    victims = sorted({str(split.user_ids[0]), str(split.user_ids[busiest]), str(split.user_ids[-1])})
    for victim in victims:
        reduced = _without(world, victim)
        assert reduced.num_users == split.num_users - 1
        vectors = step.fit(reduced, arrays, np.random.default_rng(11))
        index = {str(uid): j for j, uid in enumerate(reduced.user_ids)}
        pairs = [(i, index[str(uid)]) for i, uid in enumerate(split.user_ids) if str(uid) in index]
        assert len(pairs) == reduced.num_users
        full_index, reduced_index = (np.array(side) for side in zip(*pairs))
        gap = np.abs(full[full_index] - vectors[reduced_index]).max(axis=1)
        assert (gap <= 1e-5).all(), f"removing {victim} moved {int((gap > 1e-5).sum())} other users' embeddings (max {gap.max():.3g})"
    # the control: another draw of the negatives does move them
    other = step.fit(split, arrays, np.random.default_rng(12))
    assert np.abs(other - full).max() > 1e-3


# ====================================================================== what leaves a merchant
ALLOWED_METRICS = {
    "none": {"num-examples", "train-loss", "train-rows", "dp-epsilon", "dp-noise-multiplier"},
    "user": {"num-examples", "dp-steps", "dp-epsilon", "dp-noise-multiplier"},
}


@pytest.mark.usefixtures("as_server")
@pytest.mark.parametrize(("privacy", "content"), [("none", False), ("none", True), ("user", False), ("user", True)])
def test_train_reply_carries_the_global_parameters_only(tmp_path: Path, privacy: str, content: bool) -> None:
    values: dict[str, Any] = {"mf-solver": "neumf", "factors": 8, "neumf-layers": "16,8", "neumf-content": content, "content-dim": 8,
                              "neumf-user-steps": 20, "local-epochs": 1}
    if privacy == "user":
        values |= {"num-rounds": 2, "dp-metrics": "none", "dp-grad-sample-mode": "auto"}
    cfg = small_run_config(tmp_path, privacy=privacy, **values)
    node = simulated_node(cfg, 0)
    catalog = load_dataset(cfg.data_config()).catalog
    arrays = initial_model(cfg, catalog)
    shapes = global_shapes(cfg, len(catalog))
    num_users = node.data.num_users
    assert num_users not in {n for shape in shapes.values() for n in shape}  # a users dimension would show

    reply = client_call("train", cfg, arrays)
    assert not reply.has_error(), reply.error.reason
    content_record = reply.content
    assert set(content_record.metric_records) == {"metrics"}
    metrics = dict(content_record.metric_records["metrics"])
    assert set(metrics) == ALLOWED_METRICS[privacy]
    assert dict(content_record["client"]) == {"name": node.name, "server-round": 1}
    assert set(content_record.array_records) == {"arrays"}
    sent = from_array_record(content_record.array_records["arrays"])
    # exactly the NeuMF global parameters, at their global shapes: nothing with a users dimension
    assert {key: tuple(value.shape) for key, value in sent.items()} == shapes
    assert all(num_users not in value.shape for value in sent.values())
    check_global_arrays(sent, shapes)
    for key in set(shapes) - {NEUMF_CONTENT}:  # every trained parameter moved (under DP: noise reaches every coordinate)
        assert not np.array_equal(sent[key], arrays[key]), f"{key} did not train"
    if content:  # the public content embedding goes back as it came: not trained, not noised
        np.testing.assert_array_equal(sent[NEUMF_CONTENT], arrays[NEUMF_CONTENT])
    epsilon = metrics["dp-epsilon"]
    assert isinstance(epsilon, float)
    if privacy == "user":
        assert 0 < epsilon < cfg.target_epsilon and metrics["num-examples"] == 1.0  # every merchant weighs the same under DP
    else:
        assert epsilon == float("inf")

    # the user embeddings exist on the merchant's disk, at NeuMF's user width ...
    state = NodeState(tmp_path / "out" / "state" / "partition-0")
    vectors = state.load_user_factors(node.data.user_ids, 2 * cfg.factors)
    assert vectors is not None and vectors.shape == (num_users, 2 * cfg.factors) and np.abs(vectors).sum() > 0
    # ... and none of them (nor either half of one), nor any user id, is in the bytes that leave
    wire = wire_bytes(reply)
    assert len(wire) > 0
    for user_id, row in zip(node.data.user_ids, vectors):
        assert str(user_id).encode() not in wire
        for part in (row, row[: cfg.factors], row[cfg.factors :]):
            assert part.astype(np.float32).tobytes() not in wire
            assert part.astype(np.float64).tobytes() not in wire
    # the node recorded the user step with the model (serving folds new users in with it)
    assert state.load_user_step() == NeuMFUserStep.from_config(cfg)


@pytest.mark.usefixtures("as_server")
def test_client_rejects_mf_arrays_in_a_neumf_run(tmp_path: Path) -> None:
    cfg = small_run_config(tmp_path, **{"mf-solver": "neumf"})
    reply = client_call("train", cfg, init_global_arrays(cfg.synthetic_ads, cfg.factors, cfg.seed))
    assert reply.has_error() and "could not answer" in str(reply.error.reason)


# ====================================================================== DP-SGD: sensitivity
@pytest.mark.parametrize("content", [False, True])
@pytest.mark.parametrize("max_grad_norm", [0.05, 100.0])
@pytest.mark.parametrize("mode", MODES)
def test_one_user_changes_the_clipped_sum_by_at_most_max_grad_norm(world: World, mode: str, max_grad_norm: float, content: bool) -> None:
    arrays = neumf_arrays(world.num_ads, content)
    users = user_vectors(world.split.num_users)
    batch = torch.arange(12)
    removed = [0, 3, 7, 11]
    sums = clipped_sums(NeuMF.from_arrays, mode, "sum", arrays, users, world.rows, [batch] + [batch[batch != u] for u in removed], max_grad_norm)[0]
    assert sums[0].numel() == sum(int(np.prod(s)) for k, s in global_shapes_of(arrays).items() if k != NEUMF_CONTENT)

    clipped_any = False
    for u, without in zip(removed, sums[1:]):
        difference = sums[0] - without
        own = user_gradient(NeuMF.from_arrays, arrays, users, world.rows, u)
        norm = float(own.norm())
        assert norm > 0
        clipped = own * min(1.0, max_grad_norm / (norm + 1e-6))
        # the user's whole contribution is their own gradient of the whole network, clipped ...
        torch.testing.assert_close(difference, clipped, rtol=1e-4, atol=1e-6)
        # ... so never more than max_grad_norm (the sensitivity the accountant assumes)
        assert float(difference.norm()) <= max_grad_norm * (1 + 1e-4)
        if norm > max_grad_norm:
            clipped_any = True
            assert float(difference.norm()) == pytest.approx(max_grad_norm, rel=1e-3)
        else:
            assert float(difference.norm()) == pytest.approx(norm, rel=1e-3)
    assert clipped_any == (max_grad_norm < 1.0)  # the small bound does clip, the large one does not: not vacuous


def test_hooks_and_ghost_clipping_give_the_same_sum(world: World) -> None:
    arrays = neumf_arrays(world.num_ads, content=True)
    users = user_vectors(world.split.num_users)
    batch = [torch.arange(3, 20)]
    hooks = clipped_sums(NeuMF.from_arrays, "hooks", "sum", arrays, users, world.rows, batch, 0.05)[0]
    ghost = clipped_sums(NeuMF.from_arrays, "ghost", "sum", arrays, users, world.rows, batch, 0.05)[0]
    torch.testing.assert_close(hooks[0], ghost[0], rtol=1e-4, atol=1e-6)


# ====================================================================== DP-SGD: the epochs
def _settings(mode: str, noise_multiplier: float = 1.3) -> DPSGDSettings:
    return DPSGDSettings(noise_multiplier=noise_multiplier, max_grad_norm=0.1, sample_rate=0.25, epochs=2,
                         learning_rate=0.01, grad_sample_mode=mode, seed=0, normalizer=8)


@pytest.mark.parametrize(("mode", "hooks_max_floats", "expected"), [
    ("auto", None, "hooks"), ("auto", 0, "ghost"), ("opacus", None, "hooks"), ("hooks", None, "hooks"), ("ghost", None, "ghost"),
])
@pytest.mark.parametrize("content", [False, True])
def test_private_epochs_run_neumf_with_opacus_clipping(
    world: World, monkeypatch: pytest.MonkeyPatch, mode: str, hooks_max_floats: int | None, expected: str, content: bool,
) -> None:
    if hooks_max_floats is not None:
        monkeypatch.setattr(dp_sgd_epochs, "HOOKS_MAX_FLOATS", hooks_max_floats)
    used: list[str] = []
    opacus_epochs = dp_sgd_epochs._private_ad_epochs

    def spy(model: Any, chosen: str, *args: Any) -> Any:
        used.append(chosen)
        return opacus_epochs(model, chosen, *args)

    def no_fused(*args: Any) -> Any:
        raise AssertionError("NeuMF ran MF's fused closed form")

    monkeypatch.setattr(dp_sgd_epochs, "_private_ad_epochs", spy)
    monkeypatch.setattr(dp_sgd_epochs, "_fused_ad_epochs", no_fused)
    arrays = neumf_arrays(world.num_ads, content)
    users = user_vectors(world.split.num_users).numpy()
    prior = [(2.0, 1.0, 1)]
    out, history, stats = private_ad_epochs(arrays, users, lambda: world.rows, _settings(mode), list(prior), build_model=NeuMF.from_arrays)
    assert used == [expected]
    assert {key: value.shape for key, value in out.items()} == {key: value.shape for key, value in arrays.items()}
    check_global_arrays(out, global_shapes_of(arrays))
    # the accountant's history continues the given one: 2 epochs of 1 / q steps at the planned rate
    assert history[0] == prior[0] and len(history) == 2
    assert history[1] == (1.3, 0.25, 8) and stats["dp-steps"] == 8
    # noise reaches every coordinate of every parameter; the public content embedding stays as it was
    for key in parameter_keys(content):
        assert np.all(out[key] != arrays[key]), f"some coordinates of {key} got no noise"
    if content:
        np.testing.assert_array_equal(out[NEUMF_CONTENT], arrays[NEUMF_CONTENT])


def test_private_epochs_without_noise_leave_untouched_ads_alone(world: World) -> None:
    """Noise multiplier 0: only ads some user's rows read move (the check that the noise, not the data, moves the rest)."""
    arrays = neumf_arrays(world.num_ads, content=True)
    users = user_vectors(world.split.num_users).numpy()
    keep = (world.rows.ads < 20) & world.rows.mask  # rows of ads 0..19 only
    rows = UserRows(world.rows.ads, world.rows.labels, keep)
    touched = np.zeros(world.num_ads, dtype=bool)
    touched[np.unique(world.rows.ads[keep].numpy())] = True
    assert touched.any() and not touched.all()
    out, _, _ = private_ad_epochs(arrays, users, lambda: rows, _settings("hooks", noise_multiplier=0.0), [], build_model=NeuMF.from_arrays)
    for key in (NEUMF_GMF, NEUMF_MLP, AD_BIAS):
        np.testing.assert_array_equal(out[key][~touched], arrays[key][~touched], err_msg=key)
        assert np.all((out[key][touched] != arrays[key][touched]).reshape(int(touched.sum()), -1).any(axis=1)), key


def test_fused_clipping_is_refused_for_neumf(world: World) -> None:
    arrays = neumf_arrays(world.num_ads, content=False)
    users = user_vectors(world.split.num_users).numpy()
    with pytest.raises(ValueError, match="fused"):
        private_ad_epochs(arrays, users, lambda: world.rows, _settings("fused"), [], build_model=NeuMF.from_arrays)
    with pytest.raises(ValueError, match="fused"):
        resolve_grad_sample_mode("fused", 1000, 10.0, closed_form=False)
    assert resolve_grad_sample_mode("auto", 1000, 10.0, closed_form=False) == "hooks"
    assert resolve_grad_sample_mode("auto", 10**9, 10.0, closed_form=False) == "ghost"
    assert resolve_grad_sample_mode("auto", 1000, 10.0, closed_form=True) == "fused"  # MF keeps its closed form

    with pytest.raises(ValueError, match="fused"):
        RunConfig(mf_solver="neumf", dp_grad_sample_mode="fused")
    with pytest.raises(ConfigError, match="fused"):
        RunConfig.from_flower({"mf-solver": "neumf", "dp-grad-sample-mode": "fused"})
    for mode in ("auto", "opacus", "hooks", "ghost"):
        RunConfig(mf_solver="neumf", dp_grad_sample_mode=mode)
    RunConfig(mf_solver="sgd", dp_grad_sample_mode="fused")
    with pytest.raises(ValueError, match="neumf-layers"):
        RunConfig(mf_solver="neumf", neumf_layers="16,0")
    with pytest.raises(ValueError, match="neumf-layers"):
        RunConfig(mf_solver="neumf", neumf_layers="wide")


# ====================================================================== end to end
@pytest.mark.parametrize("content", [False, True])
def test_centralized_neumf_improves_ndcg(content: bool) -> None:
    from simulations.baselines import centralized

    cfg = RunConfig(synthetic_users=200, synthetic_ads=60, synthetic_merchants=1, mf_solver="neumf", privacy="none", num_rounds=2,
                    factors=8, neumf_layers="16,8", local_epochs=2, seed=7, neumf_content=content, content_dim=8)
    history = centralized(cfg, load_dataset(cfg.data_config()))
    assert [record["round"] for record in history] == [0, 1, 2]
    ndcg = [record["evaluate"]["ndcg10_full"] for record in history]
    assert ndcg[2] > ndcg[0] + 0.1, ndcg
    losses = [record["train"]["train-loss"] for record in history[1:]]
    assert losses[1] < losses[0], losses


def test_client_level_dp_is_refused_with_the_content_tower() -> None:
    # Flower's server-side DP noises every aggregated array: the public content embedding would drift
    with pytest.raises(ValueError, match="content embedding"):
        RunConfig(privacy="client", mf_solver="neumf", neumf_content=True)
    RunConfig(privacy="client", mf_solver="neumf")


@pytest.mark.parametrize("rows", [1, 3, 40])
def test_linear_norm_sampler_equals_opacus_own(rows: int) -> None:
    # both of its routes (the Gram trick for few rows, the per-sample gradient for many) against Opacus'
    from opacus.grad_sample.linear import compute_linear_norm_sample

    from client.privacy.dp_sgd_epochs import linear_norm_sample

    generator = torch.Generator().manual_seed(rows)
    layer = torch.nn.Linear(6, 5)
    inputs = torch.randn(4, rows, 6, generator=generator)
    backprops = torch.randn(4, rows, 5, generator=generator)
    ours, theirs = linear_norm_sample(layer, [inputs], backprops), compute_linear_norm_sample(layer, [inputs], backprops)
    for parameter in (layer.weight, layer.bias):
        torch.testing.assert_close(ours[parameter], theirs[parameter], rtol=1e-4, atol=1e-5)
    flat = linear_norm_sample(layer, [inputs[:, 0]], backprops[:, 0])  # one row per sample: the rank-one case
    for parameter, expected in compute_linear_norm_sample(layer, [inputs[:, 0]], backprops[:, 0]).items():
        torch.testing.assert_close(flat[parameter], expected, rtol=1e-4, atol=1e-5)


def test_serving_folds_in_and_recommends_with_neumf(world: World) -> None:
    """The merchant agent's fold-in solves a user as training's user step would, and its top-k
    follows NeuMF's scores, leaving out the user's own positives."""
    from client.serving import fold_in, recommend
    from client.user_step import NeuMFUserStep

    dataset = generate(SyntheticSpec(users=40, ads=30, merchants=1, seed=3))[0]
    arrays = neumf_arrays(world.num_ads, content=True)
    users = [str(u) for u in world.split.user_ids[:3]]
    step = NeuMFUserStep(steps=30)
    factors = fold_in(world.log, arrays, users, step, seed=5)
    assert set(factors) == set(users) and all(v.shape == (2 * arrays["ad_gmf"].shape[1],) for v in factors.values())
    again = fold_in(world.log, arrays, users, step, seed=5)
    assert all(np.array_equal(factors[u], again[u]) for u in users)  # seeded: the same vectors
    seen = {u: set(world.split.positives(i).tolist()) for i, u in enumerate(users)}
    recommendations = recommend(users, factors, arrays, dataset.catalog, seen, k=4)
    scores = score_all(np.stack([factors[u] for u in users]), arrays)
    for i, user in enumerate(users):
        mine = [r for r in recommendations if r.user_id == user]
        rows = [dataset.catalog.index[r.ad_id] for r in mine]
        assert [r.rank for r in mine] == [1, 2, 3, 4] and not set(rows) & seen[user]
        best = [a for a in np.argsort(-scores[i], kind="stable") if a not in seen[user]][:4]
        assert rows == best


@pytest.mark.usefixtures("as_server")
def test_the_public_content_embedding_survives_aggregation_and_an_altered_reply(world: World) -> None:
    """FedAvg averages whatever replies hold; the round loop then puts back the server's own copy
    of the public content embedding, so a merchant that alters it moves nothing."""
    from flwr.serverapp.strategy import FedAvg

    from server.round_loop import _adopt
    from shared.wire import TrainReply, from_array_record, to_array_record

    sent = neumf_arrays(world.num_ads, content=True)
    honest = {**sent, "ad_gmf": sent["ad_gmf"] + 0.5}
    altered = {**honest, "ad_content": sent["ad_content"] * 100.0}
    from flwr.app import Message, RecordDict

    replies = [TrainReply(name, arrays, weight).to_message(Message(content=RecordDict(), dst_node_id=1, message_type="train"))
               for name, arrays, weight in (("a", honest, 3.0), ("b", altered, 1.0))]
    aggregated, _ = FedAvg().aggregate_train(1, replies)
    assert aggregated is not None
    assert not np.array_equal(from_array_record(aggregated)["ad_content"], sent["ad_content"])  # FedAvg alone lets it move
    adopted = from_array_record(_adopt(aggregated, to_array_record(sent)))
    np.testing.assert_array_equal(adopted["ad_content"], sent["ad_content"])
    np.testing.assert_allclose(adopted["ad_gmf"], sent["ad_gmf"] + 0.5, rtol=1e-6)  # everything else is the aggregate
