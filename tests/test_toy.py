import numpy as np
import pytest
import torch

from lessons_lib import MoEConfig, MoELayer
from lessons_lib.course.toy import ToyTask, TrainLog, train


def test_task_is_deterministic_and_linear():
    task = ToyTask(8, seed=3)
    x, y = task.sample(5, torch.Generator().manual_seed(0))
    x2, y2 = ToyTask(8, seed=3).sample(5, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.allclose(y, x @ task.target_map)


def test_clustered_inputs_sit_near_their_centres():
    task = ToyTask(16, inputs="clusters", num_clusters=3, cluster_spread=0.01)
    x, _ = task.sample(50, torch.Generator().manual_seed(0))
    nearest = torch.cdist(x, task.centres).min(dim=1).values
    assert nearest.max() < 0.1


def test_bad_task():
    with pytest.raises(ValueError, match="inputs"):
        ToyTask(8, inputs="uniform")


def test_training_lowers_the_loss_and_counts_every_token():
    cfg = MoEConfig(num_experts=4, top_k=2, hidden_dim=16, ffn_dim=32)
    log = train(MoELayer(cfg), ToyTask(16), steps=60, tokens=64, lr=5e-3, aux_coef=0.01, progress=False)
    assert len(log.loss) == 60 and log.tokens_per_expert.shape == (60, 4)
    assert (log.tokens_per_expert.sum(1) == 64 * 2).all()
    assert np.mean(log.loss[-5:]) < 0.5 * np.mean(log.loss[:5])


def test_max_over_mean():
    log = TrainLog([0.0, 0.0], [1.0, 1.0], np.array([[2, 2, 2, 2], [8, 0, 0, 0]]))
    assert log.max_over_mean().tolist() == [1.0, 4.0]


def test_train_rejects_bad_sizes():
    with pytest.raises(ValueError, match="steps"):
        train(MoELayer(MoEConfig()), ToyTask(64), steps=0, tokens=8)


def test_tokens_per_rank_sums_each_rank_block():
    log = TrainLog([0.0], [1.0], np.array([[5, 1, 2, 0, 3, 3, 1, 1]]))
    assert log.tokens_per_rank(2).tolist() == [[8, 8]] and log.tokens_per_rank(4).tolist() == [[6, 2, 6, 2]]
    with pytest.raises(ValueError, match="evenly"):
        log.tokens_per_rank(3)


def test_train_logs_the_drop_rate_under_capacity():
    cfg = MoEConfig(num_experts=4, top_k=2, hidden_dim=16, ffn_dim=32, capacity_factor=0.5)
    log = train(MoELayer(cfg), ToyTask(16), steps=5, tokens=64, progress=False)
    # C = ceil(2·64/4 · 0.5) = 16 of the 32 pairs an expert gets on average: at least half are dropped
    assert len(log.drop_rate) == 5 and all(0.5 <= d < 1 for d in log.drop_rate)
    free = train(MoELayer(MoEConfig(num_experts=4, top_k=2, hidden_dim=16, ffn_dim=32)), ToyTask(16), steps=2,
                 tokens=64, progress=False)
    assert free.drop_rate == [0.0, 0.0]


def test_bias_balancing_evens_out_a_collapsed_routing():
    task = ToyTask(16, inputs="clusters", num_clusters=2, cluster_spread=0.1)
    cfg = MoEConfig(num_experts=8, top_k=2, hidden_dim=16, ffn_dim=32, router="sigmoid_bias")
    torch.manual_seed(0)
    plain = train(MoELayer(cfg), task, steps=150, tokens=128, progress=False)
    torch.manual_seed(0)
    layer = MoELayer(cfg)
    balanced = train(layer, task, steps=150, tokens=128, bias_rate=0.02, progress=False)
    assert plain.max_over_mean()[-30:].mean() > 2.0
    assert balanced.max_over_mean()[-30:].mean() < 0.7 * plain.max_over_mean()[-30:].mean()
    assert layer.router.expert_bias.abs().sum() > 0


def test_bias_balancing_needs_the_deepseek_router():
    with pytest.raises(ValueError, match="sigmoid_bias"):
        train(MoELayer(MoEConfig()), ToyTask(64), steps=1, tokens=8, bias_rate=0.01)
    with pytest.raises(ValueError, match="z_coef"):
        train(MoELayer(MoEConfig()), ToyTask(64), steps=1, tokens=8, z_coef=-1.0)
