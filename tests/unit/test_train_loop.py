"""Small pieces of the training loop."""






def test_random_scores_differ_between_processes():
    from rho1.train import TrainConfig, selection_seed

    cfg = TrainConfig(data="x", grad_accum=2)
    seeds = {selection_seed(cfg, step, m, rank) for step in range(50) for m in range(2) for rank in range(8)}
    assert len(seeds) == 50 * 2 * 8
    assert selection_seed(cfg, 3, 1, 0) == cfg.seed * 1_000_003 + 3 * 2 + 1  # one process: the stream as before
    # the global scope: every process scores the whole gathered batch, so they must share the stream
    assert {selection_seed(cfg, 3, 1, rank, global_scope=True) for rank in range(8)} == {selection_seed(cfg, 3, 1, 0)}


def test_a_note_when_the_model_ends_better_than_the_reference_on_the_target():
    from rho1.train.loop import reference_note

    beaten = {"eval/heldout/target_loss": 2.9, "eval/heldout/ref_target_loss": 3.5, "eval/other/loss": 4.0}
    note = reference_note(beaten)
    assert note is not None and "heldout" in note and "2.9000 vs 3.5000" in note
    assert reference_note({"eval/heldout/target_loss": 3.1, "eval/heldout/ref_target_loss": 2.5}) is None
    assert reference_note({"eval/heldout/target_loss": 3.1}) is None  # no reference losses: nothing to say
