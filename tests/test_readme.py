"""The README's API tour runs as written and gives the numbers it claims."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_api_tour_runs():
    tour = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)[0]
    names: dict = {}
    exec(compile(tour, "README.md", "exec"), names)
    expected = torch.tensor([0.1385, 0.2379, 0.2333, 0.1240, 0.1082, 0.1581])
    assert torch.equal(names["weights"][1].mul(1e4).round(), expected.mul(1e4).round())
    assert names["logits"].shape == (2, 9, 8000)
    assert names["step_logits"].shape == (2, 1, 8000) and names["state"].length == 1
