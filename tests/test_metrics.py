import math

import pytest
import torch

from tsbd.metrics import accuracy, attack_success_rate, der, evaluate, robust_accuracy


def test_accuracy_hand_cases():
    assert accuracy(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 0, 0])) == 0.5
    assert accuracy(torch.tensor([1, 1]), torch.tensor([1, 1])) == 1.0
    assert math.isnan(accuracy(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long)))


def test_accuracy_is_exact_at_a_threshold():
    # 250 of 2,500 right is exactly 10%: TSBD's unlearning stop test (acc <= 0.1) must see it so
    preds = torch.zeros(2500, dtype=torch.int64)
    labels = torch.ones(2500, dtype=torch.int64)
    labels[:250] = 0
    assert accuracy(preds, labels) == 0.1 and accuracy(preds, labels) <= 0.1


def test_asr_and_ra_hand_cases():
    preds = torch.tensor([0, 0, 0, 5, 3])
    assert attack_success_rate(preds, 0) == pytest.approx(0.6)
    assert attack_success_rate(preds, torch.zeros(5, dtype=torch.long)) == pytest.approx(0.6)
    assert robust_accuracy(preds, torch.tensor([1, 2, 3, 5, 3])) == pytest.approx(0.4)


@pytest.mark.parametrize(
    "acc_bd,asr_bd,acc_def,asr_def,expected",
    [
        (0.90, 0.95, 0.90, 0.95, 0.5),  # nothing changed
        (0.90, 1.00, 0.90, 0.00, 1.0),  # perfect defense
        (0.90, 0.95, 0.88, 0.05, (0.90 - 0.02 + 1) / 2),  # paper-style case
        (0.90, 0.10, 0.95, 0.20, 0.5),  # ASR rose, ACC rose: both terms clipped at 0
        (0.90, 0.95, 0.10, 0.95, (0 - 0.8 + 1) / 2),  # accuracy destroyed
    ],
)
def test_der_hand_cases(acc_bd, asr_bd, acc_def, asr_def, expected):
    assert der(acc_bd, asr_bd, acc_def, asr_def) == pytest.approx(expected)


def test_evaluate_on_a_constant_model(small, runtime):
    from tsbd.data.poison import PoisonedTest

    class AlwaysZero(torch.nn.Module):
        def forward(self, x):
            out = torch.zeros(len(x), 10)
            out[:, 0] = 1
            return out

    pt = PoisonedTest(small.test.x[:10], torch.zeros(10, dtype=torch.long), small.test.y[:10])
    m = evaluate(AlwaysZero(), small.test, pt, runtime)
    assert m["acc"] == pytest.approx(float((small.test.y == 0).float().mean()))
    assert m["asr"] == 1.0
    assert m["ra"] == pytest.approx(float((small.test.y[:10] == 0).float().mean()))
