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

    note = reference_note({"eval/heldout/target_excess_loss": -0.25, "eval/other/loss": 4.0})
    assert note is not None and "heldout" in note and "0.2500 nats" in note
    assert reference_note({"eval/heldout/target_excess_loss": 0.4}) is None
    assert reference_note({"eval/heldout/target_loss": 3.1}) is None  # no reference losses: nothing to say


def test_resume_with_another_number_of_processes_is_refused(tmp_path):
    from dataclasses import asdict

    import pytest
    import yaml

    from rho1.config import TrainConfig
    from rho1.train.checkpoint import check_same_recipe

    cfg = TrainConfig(data="store", out=str(tmp_path))
    written = asdict(cfg)  # RUN/config.yaml holds every option of the version that started the run

    def config(**changes):
        (tmp_path / "config.yaml").write_text(yaml.safe_dump({**written, **changes}))

    config()
    check_same_recipe(tmp_path, cfg, {"tokens_per_step": 4096}, "h", None, 4096)
    with pytest.raises(ValueError, match=r"the tokens per step \(4,096 -> 8,192: another number of processes"):
        check_same_recipe(tmp_path, cfg, {"tokens_per_step": 4096}, "h", None, 8192)
    # the options of a rule the run does not use may change (topk reads neither)
    config(threshold=0.5, temperature=0.1)
    check_same_recipe(tmp_path, cfg, {}, "h", None, 4096)
    # an option newer than the run's config.yaml was at its default when the run started
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({k: v for k, v in written.items() if k != "train_on"}))
    check_same_recipe(tmp_path, cfg, {}, "h", None, 4096)
    target = TrainConfig(data="store", out=str(tmp_path), train_on="target")
    with pytest.raises(ValueError, match="--train-on 'all' -> 'target'"):
        check_same_recipe(tmp_path, target, {}, "h", None, 4096)
