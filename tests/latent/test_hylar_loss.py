"""HyLaR's SFT loss on hand-worked numbers (spec hylar-deeplatent-spec.md section 4, oracle 3):
predictions [[1, 2], [0, 0]] against canvas targets [[0, 4], [1, 1]] give squares 1+4+1+1 = 7
over 4 elements, MSE 1.75; with lambda 0.5 the loss is CE + 0.875."""

import pytest
import torch

from megatron_latent.latent.hylar import HyLaR


def _method(**kw):
    return HyLaR(canvas_id=9, start_id=8, end_id=10, hidden_size=2, **kw)


def _batch():
    # one row: text, <|canvas_start|>, 2 canvas slots, <|canvas_end|>, text
    ids = torch.tensor([[5, 8, 9, 9, 10, 6]])
    loss_mask = torch.tensor([[1.0, 1.0, 0.0, 1.0, 1.0, 0.0]])  # targets: canvas not supervised
    return {"input_ids": ids, "latent_mask": ids == 9, "loss_mask": loss_mask}


def test_canvas_mse_hand_worked():
    method, batch = _method(), _batch()
    counts = method.count(batch)
    assert counts == {"ce": 4.0, "latent": 4.0}  # 2 slots x hidden 2
    batch.update(counts=counts, step_totals={k: torch.tensor(v) for k, v in counts.items()})
    step = method.sft_step(batch)
    step.targets = torch.tensor([[0.0, 4.0], [1.0, 1.0]])
    hidden = torch.zeros(6, 1, 2)  # [s, b, h]; rows 1 and 2 predict slots 2 and 3
    hidden[1, 0] = torch.tensor([1.0, 2.0])
    assert step.regression_sq(hidden).item() == 7.0
    c = 2.5  # every supervised token's CE
    out = {"ce": torch.full((1, 6), c), "latent_sq": torch.tensor(7.0)}
    total, n, logs = step.loss(out)
    # megatron divides the token-sum loss by the global CE count (training/step.py)
    assert (total / batch["step_totals"]["ce"]).item() == pytest.approx(c + 0.875)
    assert (logs["latent mse"][0] / logs["latent mse"][1]).item() == pytest.approx(1.75)
    assert method.total_loss({"lm loss": c, "latent mse": 1.75}) == pytest.approx(c + 0.875)


def test_canvas_slot_starting_a_sample_is_refused():
    ids = torch.tensor([[9, 9, 10, 6]])
    with pytest.raises(ValueError, match="starts a sample"):
        _method().count({"latent_mask": ids == 9, "loss_mask": torch.ones(1, 4)})


def test_target_grad_needs_pp1(megatron_single_rank, monkeypatch):
    """The trainable target lives on the first stage and the MSE on the last; under PP it
    crosses stages without gradient, so HyLaR's own setting is refused there."""
    from megatron.core import parallel_state as ps

    method = _method(target_grad=True, encoder_dim=8, canvas_tokens=2, compressor_heads=2)
    assert method.build_modules(None, pre_process=True, post_process=True) is not None
    monkeypatch.setattr(ps, "get_pipeline_model_parallel_world_size", lambda: 2)
    with pytest.raises(ValueError, match="PP=1"):
        method.build_modules(None, pre_process=True, post_process=False)
