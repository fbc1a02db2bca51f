import numpy as np
import pytest
import torch

from lessons_lib import MoEConfig, MoELayer
from lessons_lib.toy import ToyTask, TrainLog, train


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
