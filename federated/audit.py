"""An empirical privacy audit in one run: how much of epsilon can an attacker actually see?

    python -m federated.audit --config <federated yaml> --state-dir "$PWD/.fedforge" \
        [--canaries 200] [--guesses 100] [--confidence 0.95] [--canary-lr 0.05] \
        [--other-steps 1] [--client 0] [--seed 1]

Prints reported epsilon, the audit's lower bound, guesses, correct and confidence; writes all of
it to <state>/reports/audit-<run>.json. docs/PRIVACY.md has the setting the tiny model needs.

Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS 2023):
1. m canaries (prompts whose answers are random secret route codes) are made from a seed; each
   is put into one client's data by its own fair coin flip.
2. The federated rounds run as the product runs them: the server's `serve_rounds` (guarded
   strategy, aggregation, ledger, round files) and, for each client, its ledger and local
   training (`federated.local_train.train_round`: Opacus DP-SGD under local_dp). Only the
   transport is in-process (no Flower processes) and the canary client reads its data from
   memory, not from the dataset file.
3. Each canary is scored by how much the final adapter lowered its answer loss against the
   initial adapter (round 0, which saw no data); the lowest r/2 are guessed "included", the
   highest r/2 "excluded", the rest abstain.
4. v correct of r guesses give epsilon_lower_bound: the largest epsilon that an
   (epsilon, delta)-DP run rejects at the given confidence (the paper's Algorithm 2, delta
   included). Under a correct DP implementation the bound stays below the reported epsilon.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import platform
import random
import re
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from flwr.app import Message
from scipy import stats

from cluster.config import load_config
from cluster.entry import run_job
from cluster.errors import UserError
from cluster.federated_config import FederatedConfig
from cluster.state import StateDir
from federated.ledger import ServerLedger, in_cluster_client
from federated.local_train import train_on
from federated.node_task import ClientState, NodeTask
from federated.partition import partition_indices
from federated.plan import FederatedPlan
from federated.planning import plan_noise
from federated.privacy import ledger_epsilons, privacy_record
from federated.protocol import TrainTask
from federated.run_config import NodeConfig, RunSpec
from federated.run_files import RunFiles
from federated.server_app import serve_rounds
from llm.data import Example, collate, encode_example, load_split
from llm.lora import load_adapter
from llm.losses import per_example_loss
from llm.model import load_model, load_tokenizer

CODE_WORDS = 3  # words in a canary's secret route code
WORD_TOKEN = re.compile(r"\u0120[a-z]{4,10}")  # a byte-level BPE token: space + a word


class AuditError(UserError):
    """The audit cannot run as asked (arguments or config). The message says why."""


# -- the statistics: pure functions -------------------------------------------------------------


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[at least v of r guesses correct] if the run were (epsilon, delta)-DP, m canaries
    (Steinke, Nasr, Jagielski 2023, Algorithm 2): a Binomial(r, e^eps / (1 + e^eps)) tail, plus
    delta's share, 2 m delta times the worst ratio of the tail just below v."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # the accuracy of epsilon-DP randomized response
    beta = float(stats.binom.sf(v - 1, r, q))
    alpha, below = 0.0, 0.0
    for i in range(1, v + 1):
        below += float(stats.binom.pmf(v - i, r, q))
        alpha = max(alpha, below / i)
    return min(1.0, beta + alpha * delta * 2 * m)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float) -> float:
    """The largest epsilon an (epsilon, delta)-DP run is refuted for at `confidence`: the
    p-value of v correct of r guesses is below 1 - confidence (0 when none is refuted)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    alpha = 1 - confidence
    if p_value(m, r, v, 0.0, delta) >= alpha:
        return 0.0
    low, high = 0.0, 1.0  # p_value(low) < alpha <= p_value(high): the p-value grows with eps
    while p_value(m, r, v, high, delta) < alpha:
        low, high = high, high * 2
        if high > 1e3:  # only reached with delta 0 and every guess right on huge r
            return math.inf
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if p_value(m, r, v, middle, delta) < alpha else (low, middle)
    return low


# -- canaries, coin flips, guesses ---------------------------------------------------------------


def code_words(tokenizer) -> list[str]:
    """Lower-case words the tokenizer holds as one token (with its leading space), sorted: a
    secret code of such words gives every canary answer tokens no other canary shares."""
    return sorted({t[1:] for t in tokenizer.get_vocab() if WORD_TOKEN.fullmatch(t)})


def make_canaries(m: int, seed: int, words: list[str]) -> list[Example]:
    """m canaries from `seed`: a random account number in the prompt, and a secret route code
    of CODE_WORDS random `words` (no word in two canaries) as the answer."""
    if len(words) < CODE_WORDS * m:
        raise AuditError(f"{m} canaries need {CODE_WORDS * m} code words, {len(words)} given")
    rng = random.Random(f"canaries-{seed}")
    drawn = rng.sample(sorted(words), CODE_WORDS * m)
    return [
        Example(
            [
                {
                    "role": "user",
                    "content": f"Route this support ticket: account {rng.randrange(10**6):06d} "
                    "asks for its secret route code.",
                }
            ],
            "ROUTE: " + " ".join(drawn[CODE_WORDS * i : CODE_WORDS * (i + 1)]),
            {"canary": i},
        )
        for i in range(m)
    ]


def coin_flips(m: int, seed: int) -> list[bool]:
    """Each canary's inclusion: an independent fair coin (a stream apart from the canaries')."""
    rng = random.Random(f"inclusion-{seed}")
    return [rng.random() < 0.5 for _ in range(m)]


def guess(scores: list[float], guesses: int) -> list[bool | None]:
    """The lowest guesses/2 scores guessed included, the highest guesses/2 excluded (an odd
    extra goes to "included"), the others abstain (None)."""
    if not 0 <= guesses <= len(scores):
        raise ValueError(f"guesses must be in 0..{len(scores)}, got {guesses}")
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    k_in = guesses - guesses // 2
    out: list[bool | None] = [None] * len(scores)
    for i in order[:k_in]:
        out[i] = True
    for i in order[len(order) - guesses // 2 :]:
        out[i] = False
    return out


def canary_losses(
    cfg: FederatedConfig, model_path: str, adapter_dir: Path, canaries
) -> list[float]:
    """Each canary's mean answer-token loss under the base model with the adapter."""
    tokenizer = load_tokenizer(model_path)
    model = load_adapter(load_model(model_path, cfg.model.dtype), adapter_dir).eval()
    encoded = [
        encode_example(tokenizer, c, cfg.data.max_length, cfg.data.system_prompt) for c in canaries
    ]
    losses: list[float] = []
    with torch.no_grad():
        for start in range(0, len(encoded), 32):
            batch = collate(encoded[start : start + 32], tokenizer.pad_token_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            losses += per_example_loss(logits.logits, batch["labels"]).tolist()
    return losses


# -- the run -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditSettings:
    canaries: int = 200
    guesses: int | None = None  # default: half the canaries
    confidence: float = 0.95
    client: int = 0  # the in-cluster partition that gets the canaries
    canary_lr: float | None = None  # that client's learning rate (default: the config's)
    # The other clients' local steps (default: the config's). Fewer only saves time: the ledger
    # still charges them federation.local_steps, overstating their epsilon, never understating.
    other_steps: int | None = None
    seed: int | None = None  # canaries and coin flips (default: drawn from the OS)


@dataclass(frozen=True)
class AuditResult:
    run: str
    mode: str
    reported_epsilon: float | None  # the run's (worst client's), as registration would record
    client_epsilon: float | None  # the canary client's own, from the server's ledger
    delta: float
    canaries: int
    included: int
    guesses: int
    correct: int
    confidence: float
    lower_bound: float
    seed: int
    rounds: int
    local_steps: int
    learning_rate: float
    canary_lr: float
    other_steps: int
    noise_multiplier: float | None
    seconds: float
    date: str
    machine: str
    scores: list[float]  # per canary: final minus initial answer loss (lower: guessed included)
    inclusion: list[bool]


@dataclass
class _InProcessClient:
    """One node, trained in this process by the product's `train_on` (same ledger, same local
    training, same reply), on examples given in memory."""

    spec: RunSpec
    partition: int
    examples: list[Example]
    cfg: FederatedConfig  # the run's, or the canary client's with its own learning rate
    state: ClientState = ClientState()

    def __call__(self, msg: Message) -> Message:
        task = TrainTask.from_content(msg.content)
        node = NodeTask(self.spec, NodeConfig(partition=self.partition), task, self.state)
        result = train_on(node, self.partition, self.examples, self.cfg)
        self.state = result.client
        return Message(result.reply.to_content(), reply_to=msg)


class _InProcessGrid:
    """Flower's Grid for serve_rounds, with every node answered in this process."""

    def __init__(self, clients: dict[int, _InProcessClient]) -> None:
        self.clients = clients

    def get_node_ids(self) -> list[int]:
        return list(self.clients)

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
        return [self.clients[m.metadata.dst_node_id](m) for m in messages]


def _checked(cfg: FederatedConfig, settings: AuditSettings) -> int:
    """The number of guesses, after refusing what cannot be audited (AuditError)."""
    fed, m = cfg.federation, settings.canaries
    guesses = m // 2 if settings.guesses is None else settings.guesses
    if m < 2 or not 1 <= guesses <= m:
        raise AuditError(
            f"need at least 2 canaries (got {m}) and 1..canaries guesses (got {guesses})"
        )
    if not 0 < settings.confidence < 1:
        raise AuditError(f"--confidence must be in (0, 1), got {settings.confidence}")
    if not 0 <= settings.client < fed.num_clients:
        raise AuditError(f"--client must be a partition 0..{fed.num_clients - 1}")
    if settings.other_steps is not None and not 1 <= settings.other_steps <= fed.local_steps:
        raise AuditError(
            f"--other-steps must be in 1..federation.local_steps ({fed.local_steps}): the "
            "ledger charges every client federation.local_steps per round"
        )
    if settings.canary_lr is not None and settings.canary_lr <= 0:
        raise AuditError(f"--canary-lr must be positive, got {settings.canary_lr}")
    if max(fed.min_available_nodes, fed.min_train_nodes) > fed.num_clients:
        raise AuditError(
            "the audit runs the in-cluster clients only: federation.min_available_nodes and "
            f"min_train_nodes must be at most federation.num_clients ({fed.num_clients})"
        )
    return guesses


def _check_canary_client_kept(files: RunFiles, client: int) -> None:
    """An audit whose canary client was left out of a round measures nothing: refuse it."""
    for report in files.rounds():
        if client not in {m.partition for m in report.per_client.values()}:
            why = {**report.failed, **report.rejected}
            raise AuditError(
                f"round {report.round} left the canary client (partition {client}) out "
                f"({'; '.join(why.values()) or 'not sampled'}): the audit would measure nothing; "
                "e.g. raise federation.max_update_norm for a high --canary-lr"
            )


def _with_federation(cfg: FederatedConfig, **changes) -> FederatedConfig:
    return cfg.model_copy(update={"federation": cfg.federation.model_copy(update=changes)})


def run_audit(cfg: FederatedConfig, state: StateDir, settings: AuditSettings) -> AuditResult:
    """Canaries in, the product's rounds (a fresh run under the state dir), guesses, bound."""
    started = time.monotonic()
    guesses = _checked(cfg, settings)
    seed = settings.seed if settings.seed is not None else secrets.randbelow(2**31)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    cfg = cfg.model_copy(update={"name": f"{cfg.name}-audit-{stamp}-{seed}"})
    model_path = state.base_model(cfg.model.base)
    words = code_words(load_tokenizer(model_path))
    canaries = make_canaries(settings.canaries, seed, words)
    inclusion = coin_flips(settings.canaries, seed)
    # The product's partitions and noise plan, with the included canaries in one client's data.
    pool = list(load_split(cfg.data).train)
    partitions = partition_indices(pool, cfg.federation.num_clients, cfg.partition)
    added = [c for c, flip in zip(canaries, inclusion, strict=True) if flip]
    partitions[settings.client] += range(len(pool), len(pool) + len(added))
    pool += added
    plan = FederatedPlan(
        pool_size=len(pool), partitions=partitions, noise=plan_noise(cfg, partitions)
    )
    run = RunSpec(cfg, plan, state)
    lr = settings.canary_lr or cfg.federation.learning_rate
    canary_cfg = _with_federation(cfg, learning_rate=lr)
    other_cfg = _with_federation(
        cfg, local_steps=settings.other_steps or cfg.federation.local_steps
    )
    clients = {
        100 + p: _InProcessClient(
            run, p, [pool[i] for i in part], canary_cfg if p == settings.client else other_cfg
        )
        for p, part in enumerate(partitions)
    }
    serve_rounds(run, _InProcessGrid(clients))

    files, rounds = RunFiles(state, cfg.name), cfg.federation.rounds
    files.check_complete(rounds)
    _check_canary_client_kept(files, settings.client)
    before = canary_losses(cfg, model_path, files.adapter_dir(0), canaries)
    after = canary_losses(cfg, model_path, files.adapter_dir(rounds), canaries)
    scores = [a - b for a, b in zip(after, before, strict=True)]
    made = guess(scores, guesses)
    correct = sum(g == flip for g, flip in zip(made, inclusion, strict=True) if g is not None)
    ledger = ServerLedger(files.root)
    record = privacy_record(cfg, plan, files.rounds(), ledger)
    client_eps = ledger_epsilons(cfg, plan, ledger).get(in_cluster_client(settings.client))
    return AuditResult(
        run=cfg.name,
        mode=cfg.privacy.mode,
        reported_epsilon=record.epsilon,
        client_epsilon=client_eps,
        delta=cfg.privacy.delta,
        canaries=settings.canaries,
        included=len(added),
        guesses=guesses,
        correct=correct,
        confidence=settings.confidence,
        lower_bound=epsilon_lower_bound(
            settings.canaries, guesses, correct, cfg.privacy.delta, settings.confidence
        ),
        seed=seed,
        rounds=rounds,
        local_steps=cfg.federation.local_steps,
        learning_rate=cfg.federation.learning_rate,
        canary_lr=lr,
        other_steps=other_cfg.federation.local_steps,
        noise_multiplier=plan.noise.noise_multiplier if plan.noise else None,
        seconds=time.monotonic() - started,
        date=stamp,
        machine=f"{platform.machine()}, {torch.get_num_threads()} threads, "
        + ("cuda" if torch.cuda.is_available() else "no GPU"),
        scores=scores,
        inclusion=inclusion,
    )


def table(result: AuditResult) -> str:
    def eps(value: float | None) -> str:
        return "n/a (no DP)" if value is None else f"{value:.3f}"

    rows = [
        ("privacy mode", result.mode),
        ("reported epsilon (run)", f"{eps(result.reported_epsilon)} at delta {result.delta:g}"),
        ("reported epsilon (canary client)", eps(result.client_epsilon)),
        ("audit lower bound", f"{result.lower_bound:.3f}"),
        ("canaries (included)", f"{result.canaries} ({result.included})"),
        ("guesses", str(result.guesses)),
        ("correct", str(result.correct)),
        ("confidence", f"{result.confidence:g}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def write_report(state: StateDir, result: AuditResult) -> Path:
    state.reports.mkdir(parents=True, exist_ok=True)
    path = state.reports / f"audit-{result.run}.json"
    path.write_text(json.dumps(asdict(result), indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="One-run canary audit of a federated config")
    parser.add_argument(
        "--config", required=True, help="federated YAML, e.g. configs/federated/tiny.yaml"
    )
    parser.add_argument("--state-dir", default=None, help="state directory (default: ./.fedforge)")
    parser.add_argument("--canaries", type=int, default=200, help="canaries m (default 200)")
    parser.add_argument("--guesses", type=int, default=None, help="guesses r (default m/2)")
    parser.add_argument("--confidence", type=float, default=0.95, help="of the lower bound")
    parser.add_argument("--client", type=int, default=0, help="partition given the canaries")
    parser.add_argument("--canary-lr", type=float, default=None, help="its learning rate")
    parser.add_argument(
        "--other-steps", type=int, default=None, help="local steps of the other clients"
    )
    parser.add_argument("--seed", type=int, default=None, help="canaries and coin flips")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, FederatedConfig)
    state = StateDir.resolve(args.state_dir)
    settings = AuditSettings(
        canaries=args.canaries,
        guesses=args.guesses,
        confidence=args.confidence,
        client=args.client,
        canary_lr=args.canary_lr,
        other_steps=args.other_steps,
        seed=args.seed,
    )
    logging.getLogger("flwr").setLevel(logging.WARNING)  # one line per round is enough here
    result = run_audit(cfg, state, settings)
    print(table(result), flush=True)
    print(f"[fedforge] audit report: {write_report(state, result)}", flush=True)
    return 0


if __name__ == "__main__":
    run_job(main)
