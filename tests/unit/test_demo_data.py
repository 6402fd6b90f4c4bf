"""The demo corpora."""

import json


def test_demo_data_is_deterministic_and_keeps_heldout_out_of_training(tmp_path):
    from rho1.experiments.demo_data import generate

    a = generate(tmp_path / "a", seed=3, n_reference=50, n_web=200, n_heldout=30, n_offtarget=5)
    b = generate(tmp_path / "b", seed=3, n_reference=50, n_web=200, n_heldout=30, n_offtarget=5)
    for name in a:
        assert a[name].read_bytes() == b[name].read_bytes()
    heldout = [json.loads(line)["question"] for line in a["heldout"].read_text().splitlines()]
    reference = {json.loads(line)["question"] for line in a["reference"].read_text().splitlines()}
    web = a["web"].read_text()
    assert not reference & set(heldout)
    assert not any(q in web for q in heldout)
    assert "#### " in web and "https://" in web
