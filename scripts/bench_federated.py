"""Federated overheads, in one run on one machine:

1. DP-SGD step time against a plain step: same LoRA model, batch and sequence length; Opacus
   per-sample gradients with hooks (what the clients use) and with ghost clipping.
2. Round wall time against the slowest client's local compute (model load + local steps, as
   each client measures it), from real `federated.run`s (SuperLink + SuperNodes on Ray): with
   Flower's fresh ClientApp process per message (`flower.warm_clients: false`, stock), and with
   the in-cluster SuperNodes' training handed to warm Ray actors (the default).

    python scripts/bench_federated.py [--model demo|tiny] [--steps 4] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import yaml
from opacus import PrivacyEngine
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cluster.core.config import dump_config  # noqa: E402
from cluster.core.federated_config import FederatedConfig  # noqa: E402
from cluster.core.jobs import FEDERATE  # noqa: E402
from cluster.core.state import StateDir  # noqa: E402
from federated.local_train import client_model_and_optimizer  # noqa: E402
from federated.partition import client_examples  # noqa: E402
from federated.planning import make_plan  # noqa: E402
from federated.privacy.dp_sgd import dp_train_step  # noqa: E402
from federated.run_files import RunFiles  # noqa: E402
from federated.strategy import RoundReport  # noqa: E402
from llm.data import IGNORE_INDEX, collate, encode_example  # noqa: E402
from llm.model import load_tokenizer  # noqa: E402
from llm.training import train_step  # noqa: E402


def bench_config(model: str, rounds: int, name: str, warm: bool) -> FederatedConfig:
    raw = yaml.safe_load((REPO / "configs/federated/demo.yaml").read_text())
    raw["name"] = name
    raw["model"]["base"] = model
    raw["data"]["path"] = str(REPO / raw["data"]["path"])
    raw["federation"]["rounds"] = rounds
    raw["federation"].pop("initial_adapter", None)  # timing only: start from a fresh adapter
    # Round overhead does not depend on DP, and a run under DP keeps no timings (DP does not
    # cover them): time the rounds without it. DP's own cost is the step table's.
    raw["privacy"] = {"mode": "none"}
    raw["flower"] = {
        "fleet_port": 19292,
        "control_port": 19293,
        "serverappio_port": 19291,
        "warm_clients": warm,
    }
    return FederatedConfig.model_validate(raw)


def _fixed_batch(cfg: FederatedConfig, model_path: str) -> tuple[list[dict], dict]:
    tokenizer = load_tokenizer(model_path)
    examples = client_examples(cfg.data, make_plan(cfg), 0)
    encoded = [
        encode_example(tokenizer, e, cfg.data.max_length, cfg.data.system_prompt) for e in examples
    ]
    batch = collate(encoded[: cfg.federation.batch_size], tokenizer.pad_token_id)
    return encoded, batch


def _time_steps(step, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_times(cfg: FederatedConfig, model_path: str, steps: int, warmup: int) -> dict[str, float]:
    encoded, batch = _fixed_batch(cfg, model_path)
    lr, pad = cfg.federation.learning_rate, load_tokenizer(model_path).pad_token_id
    results = {}

    def fresh():
        return client_model_and_optimizer(cfg, model_path, torch.device("cpu"))

    model, optimizer = fresh()
    results["plain"] = _time_steps(lambda: train_step(model, optimizer, batch, lr), steps, warmup)
    for mode in ("hooks", "ghost"):
        model, optimizer = fresh()
        loader = DataLoader(
            encoded,
            batch_size=len(batch["input_ids"]),
            collate_fn=partial(collate, pad_token_id=pad),
        )
        extra = {"criterion": torch.nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)}
        wrapped = PrivacyEngine().make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=cfg.privacy.max_grad_norm,
            poisson_sampling=False,  # a fixed batch: time the step, not the sampling
            grad_sample_mode=mode,
            **(extra if mode == "ghost" else {}),
        )
        if mode == "hooks":
            model, optimizer, _ = wrapped
            step = partial(dp_train_step, model, optimizer, batch, lr)
        else:
            model, optimizer, criterion, _ = wrapped

            def step(model=model, optimizer=optimizer, criterion=criterion):
                logits = model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits[:, :-1]
                targets = batch["labels"][:, 1:]
                loss = criterion(
                    logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), shape=logits.shape
                )
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        results[f"dp-{mode}"] = _time_steps(step, steps, warmup)
    return results


def round_times(cfg: FederatedConfig, state: StateDir) -> list[RoundReport]:
    config_path = state.root / "bench-federated.yaml"
    dump_config(cfg, config_path)
    subprocess.run(
        [
            sys.executable,
            "-m",
            FEDERATE.module,
            "--config",
            str(config_path),
            "--state-dir",
            str(state.root),
        ],
        cwd=REPO,
        check=True,
    )
    return RunFiles(state, cfg.name).rounds()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo", choices=["demo", "tiny"])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    home = StateDir.resolve()
    model_path = home.base_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        state = StateDir.resolve(tmp)
        (state.root / "models").symlink_to(home.models)
        cfg = bench_config(args.model, args.rounds, f"bench-{time.time_ns()}", warm=False)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # like one client on one CPU
        steps = step_times(cfg, model_path, args.steps, args.warmup)
        torch.set_num_threads(threads)
        rounds = {
            warm: round_times(
                bench_config(args.model, args.rounds, f"bench-{time.time_ns()}", warm), state
            )
            for warm in (False, True)
        }
    batch = f"batch {cfg.federation.batch_size} x {cfg.data.max_length} tokens, 1 thread"
    print(f"\nDP-SGD step vs plain step ({args.model}, LoRA r={cfg.lora.r}, {batch})")
    print(f"{'variant':<10} {'s/step':>8} {'x plain':>8}")
    for name, seconds in steps.items():
        print(f"{name:<10} {seconds:>8.3f} {seconds / steps['plain']:>8.2f}")
    clients = cfg.federation.num_clients
    print(f"\nRound wall time vs slowest client ({clients} in-cluster SuperNodes, no DP)")
    print(f"{'ClientApp':<22} {'round':>5} {'wall s':>8} {'slowest client s':>17} {'ratio':>6}")
    for warm, entries in rounds.items():
        label = "warm Ray actor" if warm else "fresh process (stock)"
        for report in entries:
            wall, slowest = report.seconds, report.slowest_client_seconds
            ratio = wall / slowest
            print(f"{label:<22} {report.round:>5} {wall:>8.1f} {slowest:>17.1f} {ratio:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
