"""``l2l.algorithms.MAML`` used the way learn2learn's examples use it gives the fast path's numbers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.testing import assert_close

import metagrad.compat.learn2learn as l2l
from metagrad.algorithms import meta_batch_loss
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
    out = meta_batch_loss("maml", model, params, {}, episode, inner_lr=0.4, inner_steps=2,
                          first_order=first_order)
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
    out = meta_batch_loss("anil", model, params, {}, episode, inner_lr=0.4, inner_steps=3)
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
    assert_close(learner(x), model(x))
    loss = F.cross_entropy(learner(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
    learner.adapt(loss)
    for (name, p), g in zip(model.named_parameters(), grads):
        assert_close(learner.params[name], p - 0.5 * g)
        assert learner.params[name].requires_grad and learner.params[name].grad_fn is not None
    for p, b in zip(model.parameters(), before):  # the module itself is never modified
        assert_close(p.detach(), b)
    assert not torch.allclose(learner(x), model(x))

    # A first-order adapt (override per call) cuts the gradient's graph: d(adapted)/d(p) is the identity.
    fo = maml.clone()
    fo.adapt(F.cross_entropy(fo(x), y), first_order=True)
    (weight_grad,) = torch.autograd.grad(fo.params["2.weight"].sum(), [model[2].weight])
    assert_close(weight_grad, torch.ones_like(weight_grad))
    # A clone of an adapted learner continues from its weights.
    again = learner.clone()
    assert_close(again(x), learner(x))


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
    learner.adapt(F.cross_entropy(learner(x), y))
    assert learner.params["unused.weight"] is model.unused.weight
    assert learner.params["used.weight"] is not model.used.weight

    model.used.bias.requires_grad_(False)
    learner = l2l.algorithms.MAML(model, lr=0.1, allow_unused=True).clone()
    with pytest.raises(RuntimeError, match="allow_nograd=True"):
        learner.adapt(F.cross_entropy(learner(x), y))
    learner = l2l.algorithms.MAML(model, lr=0.1, allow_nograd=True).clone()  # allow_unused follows it
    learner.adapt(F.cross_entropy(learner(x), y))
    assert learner.params["used.bias"] is model.used.bias
    assert learner.params["used.weight"] is not model.used.weight
