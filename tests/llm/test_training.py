from llm.training import batch_indices, learning_rate, rank_batch


def test_batch_order_depends_only_on_step():
    n, global_batch = 10, 4
    steps = [batch_indices(n, s, global_batch, seed=3) for s in range(5)]
    assert steps[3] == batch_indices(n, 3, global_batch, seed=3)  # resumable at any step
    first_epoch = [i for step in steps for i in step][:n]
    assert sorted(first_epoch) == list(range(n))  # every example once per epoch
    assert batch_indices(n, 0, global_batch, seed=4) != steps[0]


def test_ranks_split_the_global_batch_evenly_by_tokens():
    # example i has i + 1 tokens, so lengths identify examples
    encoded = [{"input_ids": [1] * (i + 1), "labels": [1] * (i + 1)} for i in range(16)]
    global_ids = batch_indices(16, 2, 8, seed=0)
    ranks = [rank_batch(encoded, 2, r, 2, 4, seed=0, pad_id=0) for r in range(2)]
    lengths = [sorted(int(n) for n in b["attention_mask"].sum(dim=1)) for b in ranks]
    assert sorted(lengths[0] + lengths[1]) == sorted(
        i + 1 for i in global_ids
    )  # disjoint, complete
    tokens = [sum(lens) for lens in lengths]
    assert abs(tokens[0] - tokens[1]) <= max(max(lens) for lens in lengths)


def test_warmup_is_linear_then_constant():
    assert [learning_rate(s, 1.0, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert learning_rate(0, 0.1, 0) == 0.1
