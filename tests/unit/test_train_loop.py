"""Small pieces of the training loop."""






def test_random_scores_differ_between_processes():
    from rho1.train import TrainConfig, selection_seed

    cfg = TrainConfig(data="x", grad_accum=2)
    seeds = {selection_seed(cfg, step, m, rank) for step in range(50) for m in range(2) for rank in range(8)}
    assert len(seeds) == 50 * 2 * 8
    assert selection_seed(cfg, 3, 1, 0) == cfg.seed * 1_000_003 + 3 * 2 + 1  # one process: the stream as before
    # the global scope: every process scores the whole gathered batch, so they must share the stream
    assert {selection_seed(cfg, 3, 1, rank, global_scope=True) for rank in range(8)} == {selection_seed(cfg, 3, 1, 0)}
