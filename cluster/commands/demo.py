"""The main job, end to end: fine-tune → federate with DP → gate → verify → serve → ask.

Each stage is a Ray job (the module a user would `ray job submit`), sent to a Ray head this
process starts, so the dashboard shows every stage. Job logs go to files under the report
directory; the terminal shows each stage's `[fedforge]` progress lines, then a summary.
"""

from __future__ import annotations

import os
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from pydantic import BaseModel

from cluster.commands.demo_report import DemoResult, summary_table, write_report
from cluster.commands.gate import run_gate
from cluster.core.config import FinetuneConfig, dump_config, load_config
from cluster.core.credentials import hash_api_key
from cluster.core.errors import UserError
from cluster.core.federated_config import FederatedConfig
from cluster.core.job_runner import follow_job, submit_job
from cluster.core.jobs import FEDERATE, FINETUNE, SERVE, VERIFY
from cluster.core.serve_config import ServeConfig
from cluster.core.state import StateDir
from cluster.records.registry import PRODUCTION, Registry, VersionRecord

REPO = Path(__file__).resolve().parents[2]
STAGES = 5
SERVE_STAGE = "serve and ask"  # the last stage; its job runs until the demo stops it
DEMO_PROMPTS = [
    "Route this support ticket: I was charged twice for my subscription. Please help.",
    "Route this support ticket: My parcel never arrived and tracking has not moved.",
    "Route this support ticket: I cannot log in after resetting my password.",
    "Route this support ticket: Please delete my account and all my data.",
]


@dataclass(frozen=True)
class StageConfigs:
    finetune: FinetuneConfig
    federated: FederatedConfig
    serve: ServeConfig


@dataclass(frozen=True)
class Profile:
    finetune: Path
    federated: Path
    serve: Path
    requests: int  # demo requests sent to the endpoint (latency statistics)

    def load(self, tracking_uri: str | None = None) -> StageConfigs:
        """The three stage configs, validated, and checked to share one registry: the gate
        compares versions that both training stages registered in it. `tracking_uri` (an
        MLflow server every node of a cluster reaches) replaces each stage's registry.tracking_uri.
        """
        loaded = [
            load_config(self.finetune, FinetuneConfig),
            load_config(self.federated, FederatedConfig),
            load_config(self.serve, ServeConfig),
        ]
        if tracking_uri:
            registry = {"tracking_uri": tracking_uri}
            loaded = [
                c.model_copy(update={"registry": c.registry.model_copy(update=registry)})
                for c in loaded
            ]
        configs = StageConfigs(*loaded)
        stores = {
            self.finetune: configs.finetune.registry.tracking_uri,
            self.federated: configs.federated.registry.tracking_uri,
            self.serve: configs.serve.registry.tracking_uri,
        }
        if len(set(stores.values())) > 1:
            listed = ", ".join(f"{path}: {uri or 'default'}" for path, uri in stores.items())
            raise UserError(f"the demo's stages must share registry.tracking_uri ({listed})")
        if configs.finetune.registry.model_name != configs.federated.registry.model_name:
            raise UserError(
                f"registry.model_name differs between {self.finetune} and {self.federated}: "
                "the gate compares versions of one model"
            )
        return configs


def _profile(name: str, requests: int) -> Profile:
    configs = REPO / "configs"
    return Profile(
        *(configs / stage / f"{name}.yaml" for stage in ("finetune", "federated", "serve")),
        requests=requests,
    )


PROFILES = {
    "demo": _profile("demo", 16),
    "tiny": _profile("tiny", 6),
    # A real GPU cluster (see the README): hub model, GPU workers and SuperNodes, vLLM on GPU.
    "gpu": _profile("gpu", 64),
}


class StageFailed(RuntimeError):
    def __init__(self, stage: str, job_id: str | None, log: Path | None, why: str = "") -> None:
        where = f" (Ray job {job_id}; log {log})" if job_id else ""
        super().__init__(f"stage '{stage}' failed{where}{': ' + why if why else ''}")


class Demo:
    def __init__(
        self, profile: Profile, state: StateDir, report_dir: Path, tracking_uri: str | None = None
    ) -> None:
        self.profile = profile
        self.configs = profile.load(tracking_uri)
        self.state = state
        self.report_dir = report_dir
        self.registry = Registry.from_settings(self.configs.finetune.registry, state)
        self.model_name = self.configs.finetune.registry.model_name
        self.client = None
        self.python = sys.executable  # a local head runs jobs in this environment
        self.host = "127.0.0.1"  # where the endpoint is reached
        self.serving_job: str | None = None
        self.api_key = "sk-demo-" + secrets.token_hex(12)
        self.result = DemoResult()

    def _config_file(self, name: str, config: BaseModel) -> str:
        """Write a stage's typed config next to the report: the job reads exactly this."""
        path = self.report_dir / f"{name}.yaml"
        dump_config(config, path)
        return str(path)

    # -- stages -------------------------------------------------------------------------------

    def _stage(
        self,
        n: int,
        name: str,
        module: str,
        args: list[str],
        env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> str:
        """Run one stage as a Ray job; echo its progress lines; raise StageFailed on failure."""
        print(f"\n[fedforge] stage {n}/{STAGES}: {name}", flush=True)
        log = self._log(n, name)
        args = [*args, "--state-dir", str(self.state.root)]
        job_id = submit_job(self.client, module, args, env, python=self.python)
        if not wait:
            return job_id
        with log.open("w") as sink:

            def on_text(text: str) -> None:
                sink.write(text)
                sink.flush()
                for line in text.splitlines():
                    # Worker lines come prefixed by Ray, e.g. "(RayTrainWorker pid=1) [fedforge]".
                    start = line.find("[fedforge]")
                    if start < 0 and line.startswith("error:"):
                        start = 0
                    if start >= 0:
                        print("   ", line[start:], flush=True)

            ok = follow_job(self.client, job_id, on_text)
        if not ok:
            raise StageFailed(name, job_id, log)
        return job_id

    def _log(self, n: int, name: str) -> Path:
        return self.report_dir / f"{n}-{name.split()[0]}.log"

    def _newest(self) -> VersionRecord:
        return max(self.registry.versions(self.model_name), key=lambda v: int(v.version))

    def fine_tune(self) -> None:
        args = ["--config", self._config_file("finetune", self.configs.finetune)]
        self._stage(1, "fine-tune (central share)", FINETUNE.module, args)
        self.result.versions["fine-tuned"] = self._newest()

    def federate(self) -> None:
        cfg = self.configs.federated
        start = f"{self.model_name}:{self.result.versions['fine-tuned'].version}"
        federation = cfg.federation.model_copy(update={"initial_adapter": start})
        config = self._config_file("federated", cfg.model_copy(update={"federation": federation}))
        self._stage(2, "federate (clients' shares, DP)", FEDERATE.module, ["--config", config])
        self.result.versions["federated"] = self._newest()

    def gate(self) -> None:
        """Promote the better new version to production only if it beats the current one."""
        print(f"\n[fedforge] stage 3/{STAGES}: gate", flush=True)
        candidates = list(self.result.versions.values())
        self.result.gate = run_gate(self.registry, self.model_name, candidates)
        print(f"    [fedforge] {self.result.gate.message}", flush=True)

    def verify(self) -> None:
        """Evaluate the production version as served: downloaded back from the registry."""
        config = self.report_dir / "finetune.yaml"  # written by the fine-tune stage
        args = ["--config", str(config), "--ref", PRODUCTION]
        self._stage(4, "verify production from the registry", VERIFY.module, args)

    def serve_and_ask(self) -> None:
        cfg = self.configs.serve
        # Only the key's hash enters the job's runtime env (`ray job list` and the dashboard
        # show it); the demo keeps the key itself to call the endpoint.
        env = {cfg.auth.api_keys_env: hash_api_key(self.api_key)}
        args = ["--config", self._config_file("serve", cfg)]
        self.serving_job = self._stage(STAGES, SERVE_STAGE, SERVE.module, args, env, wait=False)
        self.result.endpoint = f"http://{self.host}:{cfg.http_port}/v1"
        self._ask(self.result.endpoint)

    def _ask(self, endpoint: str, timeout: float = 600.0) -> None:
        from openai import APIConnectionError, APIStatusError, APITimeoutError, OpenAI

        client = OpenAI(base_url=endpoint, api_key=self.api_key, max_retries=0, timeout=60)
        # Ready means the adapter answers: the ingress lists models before the engine is up.
        submitted, deadline = time.monotonic(), time.monotonic() + timeout
        log = self._log(STAGES, SERVE_STAGE)  # written when the demo stops the serving job
        while True:
            status = self.client.get_job_status(self.serving_job)
            if status.is_terminal():
                raise StageFailed(SERVE_STAGE, self.serving_job, log, f"job {status}")
            try:
                client.chat.completions.create(
                    model=self.model_name,
                    messages=[{"role": "user", "content": DEMO_PROMPTS[0]}],
                    max_tokens=1,
                )
                break
            except (APIConnectionError, APIStatusError, APITimeoutError):
                pass
            if time.monotonic() > deadline:
                raise StageFailed(SERVE_STAGE, self.serving_job, log, "endpoint not ready")
            time.sleep(2)
        self.result.cold_start = time.monotonic() - submitted
        print(
            f"    [fedforge] {endpoint} answered {self.result.cold_start:.0f} s after the serving "
            "job was submitted; sending requests",
            flush=True,
        )
        for i in range(self.profile.requests):
            prompt = DEMO_PROMPTS[i % len(DEMO_PROMPTS)]
            started = time.perf_counter()
            stream = client.chat.completions.create(
                model=self.model_name,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=8,
                temperature=0,
                stream=True,
            )
            text, first = "", None
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first or time.perf_counter() - started
                    text += chunk.choices[0].delta.content
            self.result.latencies.append(time.perf_counter() - started)
            self.result.first_token.append(first or self.result.latencies[-1])
            if i < len(DEMO_PROMPTS):
                self.result.answers.append((prompt, text.strip()))
        raw = client.chat.completions.with_raw_response.create(
            model=self.model_name,
            messages=[{"role": "user", "content": DEMO_PROMPTS[0]}],
            max_tokens=8,
            temperature=0,
        )
        plain = raw.parse()
        print(f"    [fedforge] {plain.model} answered: {plain.choices[0].message.content!r}")
        log = self.configs.serve.request_log
        if log.enabled:  # the report shows what the audit says of this answer
            self.result.request_log = Path(log.dir) if log.dir else self.state.request_log
            self.result.audited_request = raw.headers.get("x-request-id", "")

    def stop_serving(self) -> None:
        if self.serving_job and not self.client.get_job_status(self.serving_job).is_terminal():
            self.client.stop_job(self.serving_job)  # SIGTERM: serve.deploy shuts Serve down
            deadline = time.monotonic() + 60
            while not self.client.get_job_status(self.serving_job).is_terminal():
                if time.monotonic() > deadline:
                    break
                time.sleep(1)
        if self.serving_job:
            self._log(STAGES, SERVE_STAGE).write_text(self.client.get_job_logs(self.serving_job))


def run_demo(
    profile: Profile,
    state: StateDir,
    keep_serving: bool,
    address: str | None = None,
    tracking_uri: str | None = None,
) -> int:
    """The whole demo; returns the exit code. Every stage's Ray job shows on the dashboard.

    Without `address` it starts (and at the end stops) a local Ray head; with a job address
    (http://head:8265) it submits the stages to that cluster, whose nodes run the cluster's
    `python`, and calls the endpoint on the head's host. `tracking_uri` names the registry for
    every stage (on a cluster: an MLflow server, which every node reaches).
    """
    import ray
    from ray.job_submission import JobSubmissionClient

    from cluster.core.ray_cluster import connect

    started = time.monotonic()
    report_dir = state.reports / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    report_dir.mkdir(parents=True, exist_ok=True)
    demo = Demo(profile, state, report_dir, tracking_uri)
    if address:
        demo.client, demo.python = JobSubmissionClient(address), "python"
        demo.host = urlparse(address).hostname or "127.0.0.1"
    else:
        os.environ.pop("RAY_ADDRESS", None)  # a local head of its own, never a stray cluster
        dashboard = connect(num_cpus=max(2, os.cpu_count() or 2))
        demo.client = JobSubmissionClient(f"http://{dashboard}")
    try:
        demo.fine_tune()
        demo.federate()
        demo.gate()
        demo.verify()
        demo.serve_and_ask()
        demo.result.minutes = (time.monotonic() - started) / 60
        report = write_report(demo.result, demo.registry, state, report_dir, demo.model_name)
        print("\n" + summary_table(demo.result, demo.model_name))
        print(f"\n[fedforge] report: {report}")
        print(f"[fedforge] demo finished in {demo.result.minutes:.1f} min")
        if keep_serving:
            print(
                f"[fedforge] serving at {demo.result.endpoint} (key {demo.api_key}); Ctrl-C stops"
            )
            while True:
                time.sleep(3600)
    except StageFailed as exc:
        print(f"\nerror: {exc}", flush=True)
        return 1
    except KeyboardInterrupt:
        print("\n[fedforge] interrupted; shutting down", flush=True)
        return 130
    finally:
        demo.stop_serving()
        if not address:
            ray.shutdown()
    return 0
