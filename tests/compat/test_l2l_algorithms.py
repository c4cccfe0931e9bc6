"""``l2l.algorithms.MAML`` used the way learn2learn's examples use it gives the fast path's numbers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.testing import assert_close

import metagrad.compat.learn2learn as l2l
from metagrad.algorithms import ANIL, MAML, meta_batch_loss
from metagrad.types import Episode

MODELS = {
    "omniglot-cnn": (lambda: l2l.vision.models.OmniglotCNN(3, hidden_size=16), (1, 28, 28)),
    "omniglot-fc": (lambda: l2l.vision.models.OmniglotFC(28**2, 3), (1, 28, 28)),
    "mini-imagenet-cnn": (lambda: l2l.vision.models.MiniImagenetCNN(3, hidden_size=8), (3, 84, 84)),
}


def _episode(shape: tuple[int, ...], tasks: int = 3, ways: int = 3, shots: int = 1, queries: int = 2
             ) -> Episode:
    g = torch.Generator().manual_seed(0)
    return Episode(
        torch.rand(tasks, ways * shots, *shape, generator=g, dtype=torch.float64),
        torch.arange(ways).repeat_interleave(shots).repeat(tasks, 1),
        torch.rand(tasks, ways * queries, *shape, generator=g, dtype=torch.float64),
        torch.arange(ways).repeat_interleave(queries).repeat(tasks, 1),
    )


def _l2l_meta_gradient(maml: l2l.algorithms.MAML, episode: Episode, steps: int) -> tuple[float, list[Tensor]]:
    """learn2learn's maml_omniglot.py loop: clone, adapt, backward per task, then average the gradients."""
    total = 0.0
    for i in range(episode.num_tasks):
        support_x, support_y, query_x, query_y = episode.task(i)
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(F.cross_entropy(learner(support_x), support_y))
        loss = F.cross_entropy(learner(query_x), query_y)
        loss.backward()
        total += loss.item()
    for p in maml.parameters():
        p.grad.data.mul_(1.0 / episode.num_tasks)
    return total / episode.num_tasks, [p.grad.clone() for p in maml.parameters()]


def _assert_grads_close(actual: list[Tensor], expected: list[Tensor]) -> None:
    scale = max(g.abs().max().item() for g in expected)
    for a, b in zip(actual, expected):
        assert_close(a, b, rtol=1e-7, atol=1e-10 * scale)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_clone_adapt_matches_fast_path(name: str, first_order: bool) -> None:
    factory, shape = MODELS[name]
    torch.manual_seed(0)
    model = factory().double()
    episode = _episode(shape, tasks=2 if name == "mini-imagenet-cnn" else 3)
    maml = l2l.algorithms.MAML(model, lr=0.4, first_order=first_order)
    loss, grads = _l2l_meta_gradient(maml, episode, steps=2)

    params = dict(model.named_parameters())
    maml_ = MAML(inner_lr=0.4, inner_steps=2, first_order=first_order)
    out = meta_batch_loss(maml_, model, params, {}, episode)
    assert out.loss.item() == pytest.approx(loss, rel=1e-12)
    _assert_grads_close(grads, list(torch.autograd.grad(out.loss, list(params.values()))))


def test_anil_written_the_learn2learn_way_matches_fast_path() -> None:
    torch.manual_seed(0)
    model = l2l.vision.models.OmniglotCNN(3, hidden_size=16).double()
    episode = _episode((1, 28, 28))
    head = l2l.algorithms.MAML(model.classifier, lr=0.4)
    for i in range(episode.num_tasks):
        support_x, support_y, query_x, query_y = episode.task(i)
        learner = head.clone()
        support_f, query_f = model.features(support_x), model.features(query_x)
        for _ in range(3):
            learner.adapt(F.cross_entropy(learner(support_f), support_y))
        (F.cross_entropy(learner(query_f), query_y) / episode.num_tasks).backward()
    params = dict(model.named_parameters())
    out = meta_batch_loss(ANIL(inner_lr=0.4, inner_steps=3), model, params, {}, episode)
    expected = list(torch.autograd.grad(out.loss, list(params.values())))
    _assert_grads_close([p.grad for p in params.values()], expected)


def test_wrapper_basics() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    maml = l2l.algorithms.MAML(model, lr=0.5)
    assert maml.module is model
    assert [id(p) for p in maml.parameters()] == [id(p) for p in model.parameters()]
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    assert_close(maml(x), model(x))

    before = [p.detach().clone() for p in model.parameters()]
    learner = maml.clone()
    assert learner.module is not model and all(
        p is not q for p, q in zip(learner.parameters(), model.parameters()))
    assert_close(learner(x), model(x))
    loss = F.cross_entropy(learner(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
    learner.adapt(loss)
    # learn2learn's contract: a clone's parameters() / named_parameters() are its fast weights.
    fast = dict(learner.module.named_parameters())
    # As in learn2learn, the wrapper's own names carry the "module." prefix.
    assert list(dict(learner.named_parameters())) == [f"module.{k}" for k, _ in model.named_parameters()]
    for (name, p), g in zip(model.named_parameters(), grads):
        assert_close(fast[name], p - 0.5 * g)
        assert fast[name].requires_grad and fast[name].grad_fn is not None
    assert [id(p) for p in learner.parameters()] == [id(p) for p in fast.values()]
    assert_close(learner.module[2](torch.tanh(learner.module[0](x))), learner(x))  # .module is adapted too
    assert getattr(learner, "0") is learner.module[0]  # attribute lookup falls back to the module
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        learner.nothing  # noqa: B018
    with pytest.raises(AttributeError):  # not a RecursionError, before __init__ has run
        l2l.algorithms.MAML.__new__(l2l.algorithms.MAML).anything  # noqa: B018
    for p, b in zip(model.parameters(), before):  # the original module is never modified
        assert_close(p.detach(), b)
    assert not torch.allclose(learner(x), model(x))

    # A first-order adapt (override per call) cuts the gradient's graph: d(adapted)/d(p) is the identity.
    fo = maml.clone()
    fo.adapt(F.cross_entropy(fo(x), y), first_order=True)
    (weight_grad,) = torch.autograd.grad(fo.module[2].weight.sum(), [model[2].weight])
    assert_close(weight_grad, torch.ones_like(weight_grad))
    # A clone of an adapted learner continues from its weights and adapts on without touching them.
    again = learner.clone()
    assert_close(again(x), learner(x))
    again.adapt(F.cross_entropy(again(x), y))
    assert all(torch.equal(p, q) for p, q in zip(learner.parameters(), fast.values()))
    assert not torch.allclose(again(x), learner(x))


def test_two_steps_and_a_clone_of_a_clone_match_a_hand_unrolled_reference() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(9, 4, dtype=torch.float64)
    y = torch.arange(3).repeat(3)
    for first_order in (False, True):
        model.zero_grad()
        learner = l2l.algorithms.MAML(model, lr=0.3, first_order=first_order).clone()
        learner.adapt(F.cross_entropy(learner(x), y))
        learner = learner.clone()
        learner.adapt(F.cross_entropy(learner(x), y))
        F.cross_entropy(learner(x), y).backward()

        params = dict(model.named_parameters())
        fast = dict(params)
        for _ in range(2):
            loss = F.cross_entropy(torch.func.functional_call(model, fast, (x,)), y)
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            fast = {k: p - 0.3 * g for (k, p), g in zip(fast.items(), grads)}
        for k, p in dict(learner.module.named_parameters()).items():
            assert_close(p, fast[k])
        query = F.cross_entropy(torch.func.functional_call(model, fast, (x,)), y)
        expected = torch.autograd.grad(query, list(params.values()))
        _assert_grads_close([p.grad for p in params.values()], list(expected))


class _WithBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.norm = nn.BatchNorm1d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.linear(x))


def test_modules_with_buffers_and_tied_weights() -> None:
    torch.manual_seed(0)
    model = _WithBuffer().double()
    maml = l2l.algorithms.MAML(model, lr=0.1)
    learner = maml.clone()
    # Buffers that do not require grad are shared, as in learn2learn: BatchNorm's running statistics
    # move in the original module when a clone runs in training mode.
    assert learner.module.norm.running_mean is model.norm.running_mean
    x = torch.randn(5, 3, dtype=torch.float64)
    learner.adapt(learner(x).square().sum())
    assert not torch.equal(model.norm.running_mean, torch.zeros(2, dtype=torch.float64))
    assert dict(learner.module.named_buffers()).keys() == dict(model.named_buffers()).keys()

    tied = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Tanh(), nn.Linear(3, 3, bias=False)).double()
    tied[2].weight = tied[0].weight
    clone = l2l.clone_module(tied)
    assert clone[0].weight is clone[2].weight and len(list(clone.parameters())) == 1
    learner = l2l.algorithms.MAML(tied, lr=0.1).clone()
    learner.adapt(learner(x).square().sum())
    assert learner.module[0].weight is learner.module[2].weight  # the update keeps the tie


class _PartlyUsed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(4, 2)
        self.unused = nn.Linear(1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.used(x)


def test_allow_unused_and_allow_nograd() -> None:
    model = _PartlyUsed().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1, 1])

    learner = l2l.algorithms.MAML(model, lr=0.1).clone()
    with pytest.raises(RuntimeError, match="allow_unused=True"):
        learner.adapt(F.cross_entropy(learner(x), y))
    learner = l2l.algorithms.MAML(model, lr=0.1, allow_unused=True).clone()
    unused_before = learner.module.unused.weight
    learner.adapt(F.cross_entropy(learner(x), y))
    assert learner.module.unused.weight is unused_before
    assert not torch.equal(learner.module.used.weight, model.used.weight)

    model.used.bias.requires_grad_(False)
    learner = l2l.algorithms.MAML(model, lr=0.1, allow_unused=True).clone()
    with pytest.raises(RuntimeError, match="allow_nograd=True"):
        learner.adapt(F.cross_entropy(learner(x), y))
    learner = l2l.algorithms.MAML(model, lr=0.1, allow_nograd=True).clone()  # allow_unused follows it
    learner.adapt(F.cross_entropy(learner(x), y))
    assert torch.equal(learner.module.used.bias, model.used.bias)
    assert not torch.equal(learner.module.used.weight, model.used.weight)


@pytest.mark.parametrize("first_order", [False, True])
def test_metasgd_matches_a_hand_unrolled_float64_reference(first_order: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    meta = l2l.algorithms.MetaSGD(model, lr=0.3, first_order=first_order)
    with torch.no_grad():  # distinct rates per element, so a mix-up of rates and parameters shows
        for lr in meta.lrs:
            lr.mul_(torch.rand_like(lr) + 0.5)
    assert len(list(meta.parameters())) == 2 * len(list(model.parameters()))
    g = torch.Generator().manual_seed(1)
    tasks = [(torch.randn(6, 4, generator=g, dtype=torch.float64), torch.arange(3).repeat(2),
              torch.randn(9, 4, generator=g, dtype=torch.float64), torch.arange(3).repeat(3))
             for _ in range(2)]
    for support_x, support_y, query_x, query_y in tasks:
        learner = meta.clone()
        for _ in range(2):
            learner.adapt(F.cross_entropy(learner(support_x), support_y))
        F.cross_entropy(learner(query_x), query_y).backward()

    params = dict(model.named_parameters())
    lrs = [lr.detach().clone().requires_grad_() for lr in meta.lrs]
    total = torch.zeros((), dtype=torch.float64)
    for support_x, support_y, query_x, query_y in tasks:
        fast = list(params.values())
        for _ in range(2):
            loss = F.cross_entropy(torch.func.functional_call(model, dict(zip(params, fast)), (support_x,)),
                                   support_y)
            grads = torch.autograd.grad(loss, fast, create_graph=not first_order)
            fast = [p - lr * gr for p, lr, gr in zip(fast, lrs, grads)]
        logits = torch.func.functional_call(model, dict(zip(params, fast)), (query_x,))
        total = total + F.cross_entropy(logits, query_y)
    expected = torch.autograd.grad(total, [*params.values(), *lrs])
    actual = [p.grad for p in params.values()] + [lr.grad for lr in meta.lrs]
    _assert_grads_close(actual, list(expected))
    assert all(lr.grad.abs().sum() > 0 for lr in meta.lrs)  # the rates are meta-learned in both orders


def test_metasgd_lrs_argument_and_errors() -> None:
    model = nn.Linear(3, 2).double()
    meta = l2l.algorithms.MetaSGD(model, lrs=[torch.full((2, 3), 0.1, dtype=torch.float64),
                                              torch.full((2,), 0.2, dtype=torch.float64)])
    learner = meta.clone()
    x = torch.randn(4, 3, dtype=torch.float64)
    learner.adapt(learner(x).sum())
    assert_close(learner.module.bias, model.bias - 0.2 * 4)
    short = l2l.algorithms.MetaSGD(model, lrs=[torch.ones(2, 3, dtype=torch.float64)]).clone()
    with pytest.raises(ValueError, match="1 learning rates for 2 parameters"):
        short.adapt(short(x).sum())


def test_maml_update_is_adapt_after_the_gradient() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    learner = l2l.algorithms.MAML(model, lr=0.3).clone()
    learner.adapt(learner(x).square().sum())
    clone = l2l.clone_module(model)
    grads = torch.autograd.grad(clone(x).square().sum(), list(clone.parameters()), create_graph=True)
    assert l2l.algorithms.maml_update(clone, 0.3, grads) is clone
    for a, b in zip(clone.parameters(), learner.parameters()):
        assert_close(a, b)
    plain = nn.Linear(3, 1).double()
    plain(torch.ones(2, 3, dtype=torch.float64)).sum().backward()  # .grad is used when grads is None
    bias = plain.bias.detach().clone()
    l2l.algorithms.maml_update(plain, 0.5)
    assert_close(plain.bias, bias - 0.5 * 2)
    with pytest.raises(ValueError, match="1 gradients for 2 parameters"):
        l2l.algorithms.maml_update(plain, 0.5, [None])
