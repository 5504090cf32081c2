"""An empirical privacy audit in one run: how much of epsilon can an attacker actually see?

    python -m federated.audit --config <federated yaml> --state-dir "$PWD/.fedforge" \
        [--canaries 1000] [--guesses 250] [--confidence 0.95] [--two-sided] \
        [--plant-profile] [--canary-lr LR] [--seed 1]

Prints the reported epsilon, the audit's lower bound with its ceiling beside it, and each
view's bound and correct guesses; writes all of it to <state>/reports/audit-<run>.json.
docs/PRIVACY.md has the results on the demo model and the tiny one.

Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS 2023):
1. m canaries (prompts whose answers are random secret route codes) are made from a seed; each
   is given to a random in-cluster client and put into its data by its own fair coin flip.
2. The federated rounds run as the product runs them: the server's `serve_rounds` (guarded
   strategy, aggregation, ledger, round files) and, for each client, its ledger and local
   training (`federated.local_train.train_on`: Opacus DP-SGD under local_dp). Only the
   transport is in-process (no Flower processes) and the clients read their data from memory.
3. Each canary is scored by every view an adversary has of the release (higher: looks
   included): `final`, how much the final adapter lowered its answer loss against round 0's;
   `rounds`, white-box, how much each round's aggregate update lowers it to first order, summed
   over rounds; `files`, whether a file the registry would hold for the version names it.
4. Per view, the r highest scores are guessed "included" and the rest abstain (one-sided; or
   r/2 at each end, two-sided). v correct of r guesses give the largest epsilon that an
   (epsilon, delta)-DP run rejects (the paper's Algorithm 2, delta included) at the view's
   confidence, 1 - (1 - confidence) / views (Bonferroni), so the largest bound over the views
   holds at `confidence`. Under a correct DP implementation it stays below the reported
   epsilon; its ceiling (every guess right) says how large an epsilon the audit can see at all.
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
import sys
import time
from dataclasses import asdict, dataclass
from functools import cached_property
from itertools import pairwise
from pathlib import Path, PurePosixPath

import torch
from flwr.app import Message
from scipy import stats

from cluster.core.config import load_config
from cluster.core.entry import run_job
from cluster.core.errors import UserError
from cluster.core.example_ids import ExampleKey
from cluster.core.federated_config import FederatedConfig
from cluster.core.state import StateDir
from cluster.records.lineage import TRAINING_PROFILE_FILE
from cluster.records.privacy_record import PrivacyRecord
from cluster.records.prompt_features import (
    PromptFeatures,
    prompt_features,
    prompt_text,
    read_profile,
    training_profile,
)
from federated.adapter_state import load_adapter_dir
from federated.local_train import lora_model, train_on
from federated.node_task import ClientState, NodeTask
from federated.partition import partition_indices
from federated.plan import FederatedPlan
from federated.planning import plan_noise
from federated.privacy.accounting import ledger_epsilons, privacy_record
from federated.privacy.ancestry import run_use
from federated.privacy.ledger import ServerLedger, in_cluster_client
from federated.protocol import TrainTask
from federated.run_config import NodeConfig, RunSpec
from federated.run_files import RunFiles
from federated.server_app import serve_rounds
from llm.data import IGNORE_INDEX, Example, collate, encode_example, example_content, load_split
from llm.losses import per_example_loss
from llm.model import load_tokenizer
from llm.publish import own_source, registry_files

CODE_WORDS = 3  # words in a canary's secret route code
WORD_TOKEN = re.compile(r"\u0120[a-z]{4,10}")  # a byte-level BPE token: space + a word
VIEWS = ("final", "rounds", "files")
SCORE_BATCH = 32  # canaries per forward pass
PLANTED_PROFILE = f"planted/{TRAINING_PROFILE_FILE}"  # --plant-profile's file among those scored


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


def view_confidence(confidence: float, views: int) -> float:
    """Each view's confidence so that the largest of `views` bounds holds at `confidence`
    (Bonferroni: the chance that any one of them is wrong is at most the sum of theirs)."""
    return 1 - (1 - confidence) / views


def ceiling(m: int, r: int, delta: float, confidence: float) -> float:
    """The most r guesses can prove: the bound when every one of them is right."""
    return epsilon_lower_bound(m, r, r, delta, confidence)


# -- canaries, coin flips, guesses ---------------------------------------------------------------


def code_words(tokenizer) -> list[str]:
    """Lower-case words the tokenizer holds as one token (with its leading space), sorted: a
    secret code of such words gives every canary answer tokens no other canary shares."""
    return sorted({t[1:] for t in tokenizer.get_vocab() if WORD_TOKEN.fullmatch(t)})


def make_canaries(m: int, seed: int, words: list[str]) -> list[Example]:
    """m canaries from `seed`: a random account number in the prompt (no two alike, so no
    canary's prompt names another) and a secret route code of CODE_WORDS random `words` (no
    word in two canaries) as the answer."""
    if len(words) < CODE_WORDS * m:
        raise AuditError(f"{m} canaries need {CODE_WORDS * m} code words, {len(words)} given")
    rng = random.Random(f"canaries-{seed}")
    drawn = rng.sample(sorted(words), CODE_WORDS * m)
    accounts = rng.sample(range(10**6), m)
    return [
        Example(
            [
                {
                    "role": "user",
                    "content": f"Route this support ticket: account {accounts[i]:06d} "
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


def canary_clients(m: int, clients: int, seed: int) -> list[int]:
    """Each canary's client (partition id), uniform and independent of its coin."""
    rng = random.Random(f"clients-{seed}")
    return [rng.randrange(clients) for _ in range(m)]


def guess(scores: list[float], guesses: int, two_sided: bool = False) -> list[bool | None]:
    """Higher scores look included. One-sided: the `guesses` highest are guessed included, the
    others abstain (None). Two-sided: the highest guesses - guesses // 2 included, the lowest
    guesses // 2 excluded. Ties go by canary index, which no coin depends on."""
    if not 0 <= guesses <= len(scores):
        raise ValueError(f"guesses must be in 0..{len(scores)}, got {guesses}")
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    k_out = guesses // 2 if two_sided else 0
    out: list[bool | None] = [None] * len(scores)
    for i in order[: guesses - k_out]:
        out[i] = True
    for i in order[len(order) - k_out :]:
        out[i] = False
    return out


# -- the views: scores per canary ------------------------------------------------------------------


def canary_batches(cfg: FederatedConfig, tokenizer, canaries: list[Example]) -> list[dict]:
    encoded = [
        encode_example(tokenizer, c, cfg.data.max_length, cfg.data.system_prompt) for c in canaries
    ]
    return [
        collate(encoded[start : start + SCORE_BATCH], tokenizer.pad_token_id)
        for start in range(0, len(encoded), SCORE_BATCH)
    ]


def _answer_loss(model, batch: dict) -> torch.Tensor:
    """Each example's mean answer-token loss, with logits only from the position before the
    batch's first answer token to its last: the vocabulary projection of every prompt position
    would cost most of the pass (8x on the tiny model)."""
    answer = (batch["labels"] != IGNORE_INDEX).any(dim=0).nonzero().flatten()
    kept = torch.arange(int(answer.min()) - 1, int(answer.max()) + 1)
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=kept
    ).logits
    return per_example_loss(logits, batch["labels"][:, kept])


def _losses(model, batches: list[dict]) -> torch.Tensor:
    """Each canary's mean answer-token loss under the model as it is."""
    with torch.no_grad():
        return torch.cat([_answer_loss(model, b) for b in batches])


def _adapter(model, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """The LoRA tensors of a saved adapter, by the model's parameter names."""
    load_adapter_dir(model, adapter_dir)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _set_adapter(model, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)


def descent(model, batches: list[dict], start: dict, end: dict) -> torch.Tensor:
    """Per canary, -<gradient of its loss at `start` w.r.t. the LoRA tensors, end - start>: what
    the round's update lowers its loss by, to first order. Exact and batched, without a gradient
    per canary: example i of a batch sees the tensors start + e_i (end - start) (a hook adds e_i
    times the update's own output to each LoRA layer's), so one backward pass of the batch's
    summed loss gives every d loss_i / d e_i at e = 0 (the examples of a batch do not interact).
    It costs about 4 forward passes' time on the demo model (forward-mode AD: about 11)."""
    _set_adapter(model, start)
    along: dict[str, torch.Tensor] = {}  # the batch's e, read by the hooks

    def hook_for(delta: torch.Tensor):
        def hook(module, inputs, output):
            e = along["e"].view(-1, *[1] * (output.dim() - 1))
            return output + e * torch.nn.functional.linear(inputs[0], delta)

        return hook

    handles = []
    for name in start:
        layer = model.get_submodule(name.removesuffix(".weight"))
        if not isinstance(layer, torch.nn.Linear):
            raise AuditError(f"the rounds view needs LoRA on linear layers only, not {name}")
        handles.append(layer.register_forward_hook(hook_for(end[name] - start[name])))
    try:
        descents = []
        for batch in batches:
            along["e"] = torch.zeros(len(batch["input_ids"]), requires_grad=True)
            (slope,) = torch.autograd.grad(_answer_loss(model, batch).sum(), along["e"])
            descents.append(-slope)
        return torch.cat(descents)
    finally:
        for handle in handles:
            handle.remove()


def adapter_scores(
    cfg: FederatedConfig, model_path: str, files: RunFiles, canaries: list[Example]
) -> dict[str, list[float]]:
    """The views on the adapters. `final`: each canary's answer loss under round 0's adapter
    (which saw no data) minus under the final one. `rounds`: `descent` of every round's
    aggregate update (global_t - global_t-1, from the saved round adapters), at the global
    adapter that started the round, summed over rounds."""
    model = lora_model(cfg, model_path, torch.device("cpu")).eval()
    batches = canary_batches(cfg, load_tokenizer(model_path), canaries)
    saved = [_adapter(model, files.adapter_dir(t)) for t in range(cfg.federation.rounds + 1)]
    _set_adapter(model, saved[0])
    before = _losses(model, batches)
    _set_adapter(model, saved[-1])
    after = _losses(model, batches)
    along = sum(descent(model, batches, a, b) for a, b in pairwise(saved))
    return {"final": (before - after).tolist(), "rounds": along.tolist()}


def _features_key(features: PromptFeatures) -> tuple:
    return tuple(features.scalars.values()), features.sketch


def named_canaries(canaries: list[Example], name: str, text: str) -> list[bool]:
    """Which canaries a released file names: a training profile by a row equal to the features
    of the canary's prompt (rounded as profiles store them: an exact match is membership), any
    file by the canary's prompt or answer verbatim."""
    profile = PurePosixPath(name).name == TRAINING_PROFILE_FILE
    rows = {_features_key(f) for f in read_profile(text)} if profile else set()
    named = []
    for canary in canaries:
        prompt = prompt_text(canary.prompt_messages)
        stored = PromptFeatures.from_json(prompt_features(prompt).to_json())
        named.append(_features_key(stored) in rows or prompt in text or canary.answer in text)
    return named


# -- the run -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditSettings:
    canaries: int = 1000
    guesses: int = 250
    confidence: float = 0.95
    two_sided: bool = False  # guesses at both ends (default: the highest scores only)
    plant_profile: bool = False  # score a training profile of the clients' examples too
    canary_lr: float | None = None  # the clients' learning rate (default: the config's)
    seed: int | None = None  # canaries, clients and coin flips (default: drawn from the OS)


@dataclass(frozen=True)
class ViewResult:
    bound: float
    correct: int
    guesses: int
    scores: list[float]  # per canary; higher looks included


@dataclass(frozen=True)
class AuditResult:
    run: str
    mode: str
    reported_epsilon: float | None  # the run's (worst client's), as registration would record
    client_epsilon: float | None  # the worst in-cluster client's (they all hold canaries)
    delta: float
    canaries: int
    included: int
    guesses: int  # per view
    correct: int  # of the view with the largest bound
    confidence: float  # of lower_bound; each view's is view_confidence
    lower_bound: float  # the largest bound over the views
    ceiling: float  # lower_bound if every guess of a view were right
    view: str  # the view with the largest bound
    view_confidence: float
    two_sided: bool
    views: dict[str, ViewResult]
    files_scored: list[str]
    files_matched: dict[str, int]  # file -> canaries it names
    planted_profile: bool
    seed: int
    rounds: int
    local_steps: int
    learning_rate: float
    canary_lr: float
    noise_multiplier: float | None
    seconds: float  # the rounds and this scoring (a rescored run reuses its adapter views)
    date: str
    machine: str
    scores: list[float]  # the view with the largest bound's
    inclusion: list[bool]
    clients: list[int]  # each canary's client (partition id)


@dataclass
class _InProcessClient:
    """One node, trained in this process by the product's `train_on` (same ledger, same local
    training, same reply), on examples given in memory."""

    spec: RunSpec
    partition: int
    examples: list[Example]
    cfg: FederatedConfig  # the run's, or with the audit's learning rate
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


def _checked(cfg: FederatedConfig, settings: AuditSettings) -> None:
    """Refuse what cannot be audited (AuditError), before anything trains."""
    fed, m = cfg.federation, settings.canaries
    if m < 2 or not 1 <= settings.guesses <= m:
        raise AuditError(
            f"need at least 2 canaries (got {m}) and 1..canaries guesses (got {settings.guesses})"
        )
    if not 0 < settings.confidence < 1:
        raise AuditError(f"--confidence must be in (0, 1), got {settings.confidence}")
    if settings.canary_lr is not None and settings.canary_lr <= 0:
        raise AuditError(f"--canary-lr must be positive, got {settings.canary_lr}")
    if max(fed.min_available_nodes, fed.min_train_nodes) > fed.num_clients:
        raise AuditError(
            "the audit runs the in-cluster clients only: federation.min_available_nodes and "
            f"min_train_nodes must be at most federation.num_clients ({fed.num_clients})"
        )


def _check_clients_kept(files: RunFiles, clients: int) -> None:
    """An audit whose round left out a client holding canaries measures less than the run
    releases about them: refuse it."""
    for report in files.rounds():
        kept = {m.partition for m in report.per_client.values()}
        if missing := sorted(set(range(clients)) - kept):
            why = {**report.failed, **report.rejected}
            raise AuditError(
                f"round {report.round} left out client(s) {missing} "
                f"({'; '.join(why.values()) or 'not sampled'}): their canaries were not "
                "trained on; e.g. raise federation.max_update_norm for a high --canary-lr"
            )


def _with_federation(cfg: FederatedConfig, **changes) -> FederatedConfig:
    return cfg.model_copy(update={"federation": cfg.federation.model_copy(update=changes)})


@dataclass(frozen=True)
class AuditRun:
    """A finished audit run: the product's rounds over the clients' data with the included
    canaries; scored by `score_run` (once, or more: the views only read what it released)."""

    cfg: FederatedConfig  # the run's own (its name under <state>/federated/)
    state: StateDir
    plan: FederatedPlan
    canaries: list[Example]
    inclusion: list[bool]
    clients: list[int]
    pool: list[Example]  # the clients' examples and the included canaries
    seed: int
    canary_lr: float
    date: str
    seconds: float

    @property
    def files(self) -> RunFiles:
        return RunFiles(self.state, self.cfg.name)

    @cached_property
    def adapter_views(self) -> dict[str, list[float]]:
        """The `final` and `rounds` scores: computed once, however often the run is scored."""
        model_path = self.state.base_model(self.cfg.model.base)
        return adapter_scores(self.cfg, model_path, self.files, self.canaries)


def train_run(cfg: FederatedConfig, state: StateDir, settings: AuditSettings) -> AuditRun:
    """Canaries in, the product's rounds (a fresh run under the state dir, never resumed)."""
    started = time.monotonic()
    _checked(cfg, settings)
    fed, m = cfg.federation, settings.canaries
    seed = settings.seed if settings.seed is not None else secrets.randbelow(2**31)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    cfg = cfg.model_copy(update={"name": f"{cfg.name}-audit-{stamp}-{seed}"})
    canaries = make_canaries(m, seed, code_words(load_tokenizer(state.base_model(cfg.model.base))))
    inclusion, clients = coin_flips(m, seed), canary_clients(m, fed.num_clients, seed)
    # The product's partitions and noise plan, with each included canary in its client's data.
    pool = list(load_split(cfg.data).train)
    partitions = partition_indices(pool, fed.num_clients, cfg.partition)
    for canary, flip, client in zip(canaries, inclusion, clients, strict=True):
        if flip:
            partitions[client].append(len(pool))
            pool.append(canary)
    plan = FederatedPlan(
        pool_size=len(pool), partitions=partitions, noise=plan_noise(cfg, partitions)
    )
    run = RunSpec(cfg, plan, state)
    lr = settings.canary_lr or fed.learning_rate
    train_cfg = _with_federation(cfg, learning_rate=lr)
    nodes = {
        100 + p: _InProcessClient(run, p, [pool[i] for i in part], train_cfg)
        for p, part in enumerate(partitions)
    }
    serve_rounds(run, _InProcessGrid(nodes))
    files = RunFiles(state, cfg.name)
    files.check_complete(fed.rounds)
    _check_clients_kept(files, fed.num_clients)
    return AuditRun(
        cfg, state, plan, canaries, inclusion, clients, pool, seed, lr, stamp,
        time.monotonic() - started,
    )  # fmt: skip


def released_files(run: AuditRun, record: PrivacyRecord, plant: bool) -> dict[str, str]:
    """Every file registration would put in the registry for the run's version, as text: the
    final adapter's directory with its privacy.json (written as the run writes it), and the
    files `llm.publish.registry_files` builds from the run's data use (the keyed ids of the
    clients' examples, included canaries too). Not the model card: it needs the held-out
    evaluation and holds lineage and metrics on the server's split. `plant` adds a training
    profile of the clients' examples, the kind registered before profiles left out examples
    that DP protects."""
    cfg = run.cfg
    key = ExampleKey.of(run.state)
    ids = key.example_ids(example_content(e) for e in run.pool)
    uses = [run_use(record, own_source(cfg, key), key.key_id, ids)]
    adapter = run.files.adapter_dir(cfg.federation.rounds)
    record.write(adapter)
    files = {
        f.relative_to(adapter).as_posix(): f.read_bytes().decode("utf-8", "replace")
        for f in sorted(adapter.rglob("*"))
        if f.is_file()
    }
    files |= registry_files(cfg, uses, key)
    if plant:
        files[PLANTED_PROFILE] = training_profile(
            [prompt_text(e.prompt_messages) for e in run.pool]
        )
    return files


def _view(scores: list[float], run: AuditRun, settings: AuditSettings, confidence: float):
    made = guess(scores, settings.guesses, settings.two_sided)
    correct = sum(g == flip for g, flip in zip(made, run.inclusion, strict=True) if g is not None)
    bound = epsilon_lower_bound(
        settings.canaries, settings.guesses, correct, run.cfg.privacy.delta, confidence
    )
    return ViewResult(bound, correct, settings.guesses, scores)


def score_run(run: AuditRun, settings: AuditSettings) -> AuditResult:
    """Every view's scores, guesses and bound; the largest bound is the audit's."""
    started = time.monotonic()
    cfg, files = run.cfg, run.files
    ledger = ServerLedger(files.root)
    record = privacy_record(cfg, run.plan, files.rounds(), ledger)
    epsilons = ledger_epsilons(cfg, run.plan, ledger)
    in_cluster = [epsilons[c] for c in map(in_cluster_client, range(len(run.plan.partitions)))
                  if c in epsilons]  # fmt: skip
    scores = dict(run.adapter_views)
    released = released_files(run, record, settings.plant_profile)
    named = {name: named_canaries(run.canaries, name, text) for name, text in released.items()}
    scores["files"] = [float(any(by_file)) for by_file in zip(*named.values(), strict=True)]
    confidence = view_confidence(settings.confidence, len(VIEWS))
    views = {view: _view(scores[view], run, settings, confidence) for view in VIEWS}
    best = max(VIEWS, key=lambda view: views[view].bound)
    return AuditResult(
        run=cfg.name,
        mode=cfg.privacy.mode,
        reported_epsilon=record.epsilon,
        client_epsilon=max(in_cluster, default=None),
        delta=cfg.privacy.delta,
        canaries=settings.canaries,
        included=sum(run.inclusion),
        guesses=settings.guesses,
        correct=views[best].correct,
        confidence=settings.confidence,
        lower_bound=views[best].bound,
        ceiling=ceiling(settings.canaries, settings.guesses, cfg.privacy.delta, confidence),
        view=best,
        view_confidence=confidence,
        two_sided=settings.two_sided,
        views=views,
        files_scored=sorted(released),
        files_matched={name: sum(by_file) for name, by_file in named.items()},
        planted_profile=settings.plant_profile,
        seed=run.seed,
        rounds=cfg.federation.rounds,
        local_steps=cfg.federation.local_steps,
        learning_rate=cfg.federation.learning_rate,
        canary_lr=run.canary_lr,
        noise_multiplier=run.plan.noise.noise_multiplier if run.plan.noise else None,
        seconds=run.seconds + time.monotonic() - started,
        date=run.date,
        machine=f"{platform.machine()}, {torch.get_num_threads()} threads, "
        + ("cuda" if torch.cuda.is_available() else "no GPU"),
        scores=views[best].scores,
        inclusion=run.inclusion,
        clients=run.clients,
    )


def run_audit(cfg: FederatedConfig, state: StateDir, settings: AuditSettings) -> AuditResult:
    return score_run(train_run(cfg, state, settings), settings)


def table(result: AuditResult) -> str:
    def eps(value: float | None) -> str:
        return "n/a (no DP)" if value is None else f"{value:.3f}"

    sides = "two-sided" if result.two_sided else "one-sided"
    planted = ", one planted" if result.planted_profile else ""
    rows = [
        ("privacy mode", result.mode),
        ("reported epsilon (run)", f"{eps(result.reported_epsilon)} at delta {result.delta:g}"),
        ("audit lower bound", f"{result.lower_bound:.3f} ({result.view} view)"),
        ("audit ceiling", f"{result.ceiling:.3f} (every guess of a view right)"),
        *(
            (f"  {name} view", f"{view.bound:.3f}: {view.correct}/{view.guesses} correct")
            for name, view in result.views.items()
        ),
        ("files scored", f"{len(result.files_scored)}{planted}"),
        ("canaries (included)", f"{result.canaries} ({result.included})"),
        ("guesses per view", f"{result.guesses} ({sides})"),
        (
            "confidence",
            f"{result.confidence:g} ({result.view_confidence:.4f} per view, {len(VIEWS)} views)",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def blind_spot(result: AuditResult) -> str | None:
    """A warning when the audit could not refute the reported epsilon even if it leaked."""
    if result.reported_epsilon is None or result.ceiling >= result.reported_epsilon:
        return None
    return (
        f"[fedforge] warning: the audit's ceiling {result.ceiling:.3f} is below the reported "
        f"epsilon {result.reported_epsilon:.3f}: it cannot see an under-report; use more "
        "--guesses (and --canaries)"
    )


def write_report(state: StateDir, result: AuditResult) -> Path:
    """<state>/reports/audit-<run>.json; with a planted profile, audit-planted-<run>.json: it
    measures a leak put there on purpose, and the certificate's search for audits of a config
    (audit-<config name>-audit-*) must not find it."""
    state.reports.mkdir(parents=True, exist_ok=True)
    prefix = "planted-" if result.planted_profile else ""
    path = state.reports / f"audit-{prefix}{result.run}.json"
    path.write_text(json.dumps(asdict(result), indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="One-run canary audit of a federated config")
    parser.add_argument(
        "--config", required=True, help="federated YAML, e.g. configs/federated/tiny.yaml"
    )
    parser.add_argument("--state-dir", default=None, help="state directory (default: ./.fedforge)")
    parser.add_argument("--canaries", type=int, default=1000, help="canaries m (default 1000)")
    parser.add_argument("--guesses", type=int, default=250, help="guesses r per view (250)")
    parser.add_argument("--confidence", type=float, default=0.95, help="of the lower bound")
    parser.add_argument(
        "--two-sided", action="store_true", help="guess r/2 excluded too (lowest scores)"
    )
    parser.add_argument(
        "--plant-profile",
        action="store_true",
        help="score a training profile of the clients' examples too (shows a leak is flagged)",
    )
    parser.add_argument("--canary-lr", type=float, default=None, help="the clients' learning rate")
    parser.add_argument("--seed", type=int, default=None, help="canaries, clients, coin flips")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, FederatedConfig)
    state = StateDir.resolve(args.state_dir)
    settings = AuditSettings(
        canaries=args.canaries,
        guesses=args.guesses,
        confidence=args.confidence,
        two_sided=args.two_sided,
        plant_profile=args.plant_profile,
        canary_lr=args.canary_lr,
        seed=args.seed,
    )
    logging.getLogger("flwr").setLevel(logging.WARNING)  # one line per round is enough here
    result = run_audit(cfg, state, settings)
    print(table(result), flush=True)
    if warning := blind_spot(result):
        print(warning, file=sys.stderr, flush=True)
    print(f"[fedforge] audit report: {write_report(state, result)}", flush=True)
    return 0


if __name__ == "__main__":
    run_job(main)
