"""Head refit at the start of every round: a site trains from heads fitted to the master."""

from __future__ import annotations

import torch
from test_client_app import _call, _message, _setup

from ark_core.data.loaders import load_task_data
from ark_core.fed.federation import FederationConfig, load_simulation, run_fingerprint
from ark_core.model.factory import create_model
from ark_core.train.calibrate import fit_heads


def _site_refit_heads(rc: dict, master: dict) -> dict[str, torch.Tensor]:
    """hosp-a's heads fitted on the frozen master's embeddings of its training images."""
    sim, base, _ = load_simulation(rc["sim-config"], rc["data-root"], rc["run-dir"])
    tasks = load_task_data(sim.sites[0].tasks, base, splits=("train",))
    model = create_model(sim.model.model_copy(update={"init": "random"}), [t.spec for t in tasks])
    model.load_state_dict(master, strict=False)
    heads, _ = fit_heads(model, tasks, batch_size=sim.train.batch_size, standardise=False)
    return heads


def test_a_refit_round_is_the_plain_round_from_heads_fitted_to_the_master(tmp_path):
    (tmp_path / "refit").mkdir()
    (tmp_path / "plain").mkdir()
    rc, fed, master, _ = _setup(tmp_path / "refit", head_refit=True)
    refit = _call(rc, _message("train", fed, 1, master)).content["arrays"].to_torch_state_dict()
    rc_plain, fed_plain, same_master, _ = _setup(tmp_path / "plain")
    assert all(torch.equal(master[k], same_master[k]) for k in master)
    heads = _site_refit_heads(rc_plain, master)
    assert heads and all(not torch.equal(heads[k], master[k]) for k in heads)
    plain = _call(rc_plain, _message("train", fed_plain, 1, {**master, **heads}))
    plain = plain.content["arrays"].to_torch_state_dict()
    assert refit.keys() == plain.keys()
    assert all(torch.equal(refit[k], plain[k]) for k in refit)


def test_head_refit_is_in_the_fingerprint_only_when_on():
    base = {"catalogue": [{"name": "a", "labels": ["x"], "task_type": "binary"}], "rounds": 2}
    off = FederationConfig.model_validate(base)
    assert run_fingerprint(off) == run_fingerprint(
        FederationConfig.model_validate({**base, "head_refit": False}))
    assert run_fingerprint(off) != run_fingerprint(
        FederationConfig.model_validate({**base, "head_refit": True}))
