import pytest
import torch

from federated.adapter_state import adapter_to_arrays
from federated.local_train import lora_model, train_round
from federated.node_task import ClientState
from federated.partition import client_examples
from federated.planning import make_plan
from federated.privacy.accounting import epsilon_of, recompute_epsilon
from federated.privacy.dp_sgd import dp_train_step, make_private
from federated.privacy.ledger import sample_rate
from llm.data import collate, encode_example
from llm.losses import per_example_loss
from llm.model import load_tokenizer


@pytest.fixture
def private_tiny(state, tiny_config):
    path = state.base_model("tiny")
    tokenizer = load_tokenizer(path)
    examples = client_examples(tiny_config.data, make_plan(tiny_config), 0)[:32]
    encoded = [encode_example(tokenizer, e, 64) for e in examples]
    model = lora_model(tiny_config, path, torch.device("cpu"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    private = make_private(
        model,
        optimizer,
        encoded,
        batch_size=4,
        pad_id=tokenizer.pad_token_id,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        accountant="rdp",
        history=[],
    )
    return (*private, encoded, frozen, tokenizer.pad_token_id)


def test_only_lora_tensors_get_per_sample_grads_and_base_weights_never_change(private_tiny):
    model, optimizer, _, _, encoded, frozen, pad_id = private_tiny
    batch = collate(encoded[:3], pad_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    per_example_loss(logits, batch["labels"]).mean().backward()

    with_samples = {
        n for n, p in model.named_parameters() if getattr(p, "grad_sample", None) is not None
    }
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_samples == trainable and all("lora_" in n for n in with_samples)
    assert all(model.get_parameter(n).grad_sample.shape[0] == 3 for n in with_samples)
    lora_before = {n: model.get_parameter(n).detach().clone() for n in trainable}

    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for _ in range(2):
        dp_train_step(model, optimizer, collate(encoded[3:7], pad_id), lr=1e-2)

    for name, before in frozen.items():
        assert torch.equal(model.get_parameter("_module." + name), before), name
    assert any(not torch.equal(model.get_parameter(n), b) for n, b in lora_before.items())


def test_epsilon_grows_with_steps_and_matches_opacus_recomputation(private_tiny):
    model, optimizer, loader, engine, *_ = private_tiny
    rate, epsilons = loader.sample_rate, []
    assert rate == sample_rate(32, 4)  # what the plan assumes for 32 examples
    batches = iter(loader)
    for _ in range(3):
        dp_train_step(model, optimizer, next(batches), lr=1e-2)
        epsilons.append(engine.get_epsilon(1e-5))
    assert epsilons[0] < epsilons[1] < epsilons[2]
    assert engine.accountant.history == [(1.0, rate, 3)]
    assert epsilons[2] == pytest.approx(recompute_epsilon(3, rate, 1.0, 1e-5, "rdp"), rel=1e-9)


def test_an_empty_poisson_draw_is_a_noise_only_step_that_is_accounted(private_tiny):
    model, optimizer, loader, engine, *_ = private_tiny
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    empty = loader.collate_fn([])  # what the loader yields when sampling draws nobody
    assert dp_train_step(model, optimizer, empty, lr=1e-2) is None

    assert engine.accountant.history == [(1.0, loader.sample_rate, 1)]
    assert any(not torch.equal(p, lora[n]) for n, p in model.named_parameters() if n in lora)


def test_budget_accumulates_across_rounds_for_a_client(state, tiny_config):
    model_path, plan = state.base_model("tiny"), make_plan(tiny_config)
    data = client_examples(tiny_config.data, plan, 0)
    initial = adapter_to_arrays(lora_model(tiny_config, model_path, torch.device("cpu")))
    sigma = plan.noise.noise_multiplier

    def train(arrays, client, history=()):
        return train_round(
            tiny_config,
            model_path,
            data,
            data_seed=0,
            arrays=arrays,
            client=client,
            noise_multiplier=sigma,
            history=history,
        )

    round_1 = train(initial, ClientState())
    round_2 = train(round_1.arrays, round_1.client, round_1.history)

    steps = tiny_config.federation.local_steps
    assert (round_1.client.steps, round_2.client.steps) == (steps, 2 * steps)
    assert plan.noise.sample_rates[0] == sample_rate(len(data), tiny_config.federation.batch_size)
    eps_1, eps_2 = (epsilon_of(list(r.history), 1e-5, "rdp") for r in (round_1, round_2))
    assert 0 < eps_1 < eps_2
    rate = plan.noise.sample_rates[0]
    assert eps_2 == pytest.approx(recompute_epsilon(2 * steps, rate, sigma, 1e-5), rel=1e-9)
