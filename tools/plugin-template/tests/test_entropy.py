"""Uses the fixtures of ssltrain's pytest plugin (available once ssltrain is installed)."""
import torch

from ssltrain_entropy import entropy


def test_entropy_of_uniform_and_one_hot():
    assert torch.allclose(entropy(torch.zeros(2, 4)), torch.log(torch.tensor(4.0)).expand(2))
    assert entropy(torch.tensor([[100.0, 0.0]])) < 1e-6


def test_trains_logs_and_resumes(ssl_run):
    run = ssl_run(plugins=["pi_model", "entropy"], steps=10)
    assert run.summary["steps"] == 10
    assert [step for step, _ in run.scalars("entropy/ent")] == [5, 10]
    assert run.scalars("entropy/mean_confidence")
    assert run.resume(steps=15).summary["steps"] == 15
