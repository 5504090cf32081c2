import numpy as np
import torch

from federated.adapter_state import adapter_to_arrays, arrays_to_adapter, strip_opacus_prefix
from federated.local_train import lora_model
from federated.privacy.dp_sgd import make_private


def test_adapter_round_trips_through_arrayrecord_unchanged(state, tiny_config):
    path = state.base_model("tiny")
    source = lora_model(tiny_config, path, torch.device("cpu"))
    with torch.no_grad():  # LoRA B starts at zero: make every tensor distinctive
        for p in source.parameters():
            if p.requires_grad:
                p.normal_()
    arrays = adapter_to_arrays(source)
    assert arrays and all("lora_" in k and ".default." not in k for k in arrays)

    target = lora_model(tiny_config, path, torch.device("cpu"))
    arrays_to_adapter(target, arrays)
    back = adapter_to_arrays(target)
    assert list(back) == list(arrays)
    for key in arrays:
        assert back[key].numpy().dtype == arrays[key].numpy().dtype
        assert np.array_equal(back[key].numpy(), arrays[key].numpy())


def test_opacus_wrapped_model_gives_the_same_keys(state, tiny_config):
    model = lora_model(tiny_config, state.base_model("tiny"), torch.device("cpu"))
    plain = adapter_to_arrays(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    encoded = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}] * 4
    private, *_ = make_private(
        model,
        optimizer,
        encoded,
        batch_size=2,
        pad_id=0,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        accountant="rdp",
        history=[],
    )
    assert any(k.startswith("_module.") for k in private.state_dict())
    assert list(adapter_to_arrays(private)) == list(plain)
    assert strip_opacus_prefix({"_module.x._module.y": 1}) == {"x._module.y": 1}
