"""EpisodeSampler: task invariants, reproducibility and shape validation."""

from __future__ import annotations

import pytest
import torch

from metagrad.data import EpisodeSampler, FewShotDataset
from metagrad.errors import ConfigError

CLASSES, PER_CLASS = 12, 20


@pytest.fixture
def tagged_dataset() -> FewShotDataset:
    """Every image says where it comes from: pixel (0, 0) = class, pixel (0, 1) = sample index."""
    images = torch.randint(0, 256, (CLASSES, PER_CLASS, 1, 4, 4), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    images[:, :, 0, 0, 0] = torch.arange(CLASSES).unsqueeze(1)
    images[:, :, 0, 0, 1] = torch.arange(PER_CLASS)
    return FewShotDataset("tagged", "validation", images, [f"c{i}" for i in range(CLASSES)])


def origin(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, M, 1, 4, 4) float images -> (T, M) class ids and (T, M) sample ids."""
    pixels = torch.round(x[:, :, 0, 0, :2] * 255).long()
    return pixels[..., 0], pixels[..., 1]


@pytest.mark.parametrize(("ways", "shots", "query_shots"), [(5, 1, 1), (5, 5, 15), (12, 1, 19), (2, 3, 2)])
def test_task_invariants(tagged_dataset: FewShotDataset, ways: int, shots: int, query_shots: int) -> None:
    t = 16
    episode = EpisodeSampler(tagged_dataset, ways, shots, query_shots).sample(
        t, torch.Generator().manual_seed(1)
    )
    assert episode.num_tasks == t
    assert episode.support_x.shape == (t, ways * shots, 1, 4, 4) and episode.support_x.dtype == torch.float32
    assert episode.query_x.shape == (t, ways * query_shots, 1, 4, 4)
    assert episode.support_y.shape == (t, ways * shots) and episode.support_y.dtype == torch.int64
    assert episode.query_y.shape == (t, ways * query_shots)
    # labels 0..N-1, samples of one class consecutive
    assert torch.equal(episode.support_y, torch.arange(ways).repeat_interleave(shots).expand(t, -1))
    assert torch.equal(episode.query_y, torch.arange(ways).repeat_interleave(query_shots).expand(t, -1))
    # pixels are uint8 / 255
    torch.testing.assert_close(episode.support_x * 255, torch.round(episode.support_x * 255), rtol=0,
                               atol=1e-4)
    assert 0 <= episode.query_x.min() and episode.query_x.max() <= 1
    s_class, s_sample = origin(episode.support_x)
    q_class, q_sample = origin(episode.query_x)
    for i in range(t):
        # one class per label, the same in support and query; distinct classes per task
        support_classes = s_class[i].reshape(ways, shots)
        query_classes = q_class[i].reshape(ways, query_shots)
        assert ((support_classes == support_classes[:, :1]).all()
                and (query_classes == support_classes[:, :1]).all())
        assert len(set(support_classes[:, 0].tolist())) == ways
        # support and query disjoint, no image twice
        for label in range(ways):
            drawn = (s_sample[i].reshape(ways, shots)[label].tolist()
                     + q_sample[i].reshape(ways, query_shots)[label].tolist())
            assert len(set(drawn)) == shots + query_shots


def test_labels_are_assigned_at_random_and_all_classes_are_used(tagged_dataset: FewShotDataset) -> None:
    episode = EpisodeSampler(tagged_dataset, 5, 1, 1).sample(400, torch.Generator().manual_seed(0))
    classes, samples = origin(episode.support_x)
    assert set(classes[:, 0].tolist()) == set(range(CLASSES))  # label 0 lands on every class
    assert set(classes.flatten().tolist()) == set(range(CLASSES))
    assert set(samples.flatten().tolist()) == set(range(PER_CLASS))


def test_same_seed_same_tasks(tagged_dataset: FewShotDataset) -> None:
    sampler = EpisodeSampler(tagged_dataset, 5, 2, 3)
    a = sampler.sample(8, torch.Generator().manual_seed(42))
    b = EpisodeSampler(tagged_dataset, 5, 2, 3).sample(8, torch.Generator().manual_seed(42))
    c = sampler.sample(8, torch.Generator().manual_seed(43))
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
    assert not torch.equal(a.support_x, c.support_x)
    torch.manual_seed(0)  # the global seed plays no part
    d = sampler.sample(8, torch.Generator().manual_seed(42))
    assert torch.equal(a.query_x, d.query_x)


def test_consecutive_meta_batches_differ(tagged_dataset: FewShotDataset) -> None:
    g = torch.Generator().manual_seed(0)
    sampler = EpisodeSampler(tagged_dataset, 5, 1, 1)
    assert not torch.equal(sampler.sample(4, g).support_x, sampler.sample(4, g).support_x)


@pytest.mark.parametrize(
    ("ways", "shots", "query_shots", "message"),
    [
        (13, 1, 1, r"ways=13 but split 'validation' of tagged has only 12 classes; use ways <= 12"),
        (1, 1, 1, r"ways=1: a classification task needs at least 2 classes"),  # 100% for any model
        (5, 15, 6, r"shots \+ query_shots = 15 \+ 6 = 21 but each class .* has only 20 images"),
        (0, 1, 1, r"ways=0 must be a positive integer"),
        (5, -1, 1, r"shots=-1 must be a positive integer"),
        (5, 1, 0, r"query_shots=0 must be a positive integer"),
        (5.0, 1, 1, r"ways must be a positive integer, got 5.0"),
        (5, True, 1, r"shots must be a positive integer, got True"),
    ],
)
def test_impossible_shapes(tagged_dataset: FewShotDataset, ways, shots, query_shots, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        EpisodeSampler(tagged_dataset, ways, shots, query_shots)


def test_bad_num_tasks(tagged_dataset: FewShotDataset) -> None:
    with pytest.raises(ConfigError, match="num_tasks=0 must be a positive integer"):
        EpisodeSampler(tagged_dataset, 5, 1, 1).sample(0, torch.Generator())


def test_shared_fixture(tiny_dataset: FewShotDataset) -> None:
    episode = EpisodeSampler(tiny_dataset, 10, 10, 10).sample(2, torch.Generator().manual_seed(0))
    assert episode.support_x.shape == (2, 100, 1, 8, 8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_same_tasks_as_cpu(tagged_dataset: FewShotDataset) -> None:
    cpu = EpisodeSampler(tagged_dataset, 5, 1, 3).sample(8, torch.Generator().manual_seed(0))
    cuda = EpisodeSampler(tagged_dataset, 5, 1, 3, device="cuda").sample(8, torch.Generator().manual_seed(0))
    assert cuda.support_x.device.type == "cuda" and cuda.query_y.device.type == "cuda"
    on_cpu = cuda.to("cpu")
    # the same images (CUDA may divide by 255 via a reciprocal: equal up to one float32 ulp)
    assert torch.equal(origin(on_cpu.query_x)[0], origin(cpu.query_x)[0])
    assert torch.equal(torch.round(on_cpu.query_x * 255), torch.round(cpu.query_x * 255))
    torch.testing.assert_close(on_cpu.support_x, cpu.support_x, rtol=1e-6, atol=0)
    assert torch.equal(on_cpu.support_y, cpu.support_y)


RAGGED_SIZES = (3, 7, 2, 5, 4)


@pytest.fixture
def ragged_dataset() -> FewShotDataset:
    """Classes of 3, 7, 2, 5 and 4 images; pixel (0, 0) = class, pixel (0, 1) = index within the class."""
    images = torch.zeros(sum(RAGGED_SIZES), 1, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(len(RAGGED_SIZES)).repeat_interleave(torch.tensor(RAGGED_SIZES))
    images[:, 0, 0, 1] = torch.cat([torch.arange(n) for n in RAGGED_SIZES])
    return FewShotDataset("ragged", "train", images, [f"c{i}" for i in range(5)], class_sizes=RAGGED_SIZES)


def test_ragged_classes_draw_each_image_of_a_class_and_none_beyond(ragged_dataset: FewShotDataset) -> None:
    episode = EpisodeSampler(ragged_dataset, 3, 1, 1).sample(3000, torch.Generator().manual_seed(0))
    classes, samples = origin(torch.cat([episode.support_x, episode.query_x], dim=1))
    drawn = {c: set() for c in range(len(RAGGED_SIZES))}
    counts = torch.zeros(len(RAGGED_SIZES), max(RAGGED_SIZES))
    for c, s in zip(classes.flatten().tolist(), samples.flatten().tolist(), strict=True):
        drawn[c].add(s)
        counts[c, s] += 1
    assert drawn == {c: set(range(n)) for c, n in enumerate(RAGGED_SIZES)}  # all of each, nothing beyond
    for c, n in enumerate(RAGGED_SIZES):  # uniform within each class
        share = counts[c, :n] / counts[c, :n].sum()
        assert (share - 1 / n).abs().max() < 0.05
    # support and query of a class are distinct images; a task's classes are distinct
    assert (classes[:, :3] == classes[:, 3:]).all() and (samples[:, :3] != samples[:, 3:]).all()
    assert all(len(set(row)) == 3 for row in classes[:, :3].tolist())


def test_ragged_sampling_is_reproducible_and_checks_the_smallest(ragged_dataset: FewShotDataset) -> None:
    a = EpisodeSampler(ragged_dataset, 2, 1, 1).sample(5, torch.Generator().manual_seed(3))
    b = EpisodeSampler(ragged_dataset, 2, 1, 1).sample(5, torch.Generator().manual_seed(3))
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
    with pytest.raises(ConfigError, match="its smallest class of split 'train' of ragged has only 2 images"):
        EpisodeSampler(ragged_dataset, 2, 2, 1)


def test_equal_classes_draw_the_same_tasks_as_before_ragged_support(tagged_dataset: FewShotDataset) -> None:
    """The streams of equal-class datasets (and the results built on them) are unchanged: the draws are
    those of the equal-only sampler, key for key."""
    t, n, k, q = 6, 5, 2, 3
    generator = torch.Generator().manual_seed(11)
    classes = torch.rand(t, CLASSES, generator=generator).topk(n, dim=1).indices
    positions = torch.rand(t, n, PER_CLASS, generator=generator).topk(k + q, dim=2).indices
    expected = (classes.unsqueeze(2) * PER_CLASS + positions)[:, :, :k].reshape(t, n * k)
    episode = EpisodeSampler(tagged_dataset, n, k, q).sample(t, torch.Generator().manual_seed(11))
    flat = tagged_dataset.images.flatten(0, 1)
    assert torch.equal(episode.support_x, flat[expected].float() / 255)


def test_ragged_dataset_checks_its_layout() -> None:
    with pytest.raises(ValueError, match="class_sizes must be positive and sum to the 6 images"):
        FewShotDataset("x", "train", torch.zeros(6, 1, 2, 2, dtype=torch.uint8), class_sizes=(2, 3))
    with pytest.raises(ValueError, match=r"\(total_images, C, H, W\) with class_sizes"):
        FewShotDataset("x", "train", torch.zeros(2, 3, 1, 2, 2, dtype=torch.uint8), class_sizes=(3, 3))
    ragged = FewShotDataset("x", "train", torch.zeros(5, 1, 2, 2, dtype=torch.uint8), class_sizes=(2, 3))
    assert (ragged.num_classes, ragged.images_per_class, ragged.sizes) == (2, 2, (2, 3))
    assert ragged.offsets.tolist() == [0, 2] and ragged.image_shape == (1, 2, 2)
