"""A Flower federation on Ray: a SuperLink and one SuperNode per data partition, then a run.

    with Federation(RunSpec(cfg, plan, state), files) as federation:
        federation.run(on_round=print)

Secure by default: the SuperLink's Fleet API listens on every interface only when TLS and
SuperNode authentication are both on (then in-cluster and outside SuperNodes connect to it);
otherwise on loopback, with every in-cluster SuperNode placed on the SuperLink's node. Its
Control and ServerAppIo APIs always listen on loopback, so runs are submitted from its own node.
Certificates made per run are remade when their host names no longer match, and the CA's key
is never written. Leaving the block stops every process, whether the run finished, failed or
the job was stopped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import ray
import tomli_w
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cluster.core.errors import UserError
from cluster.core.federated_config import FlowerSettings
from federated.certs import make_node_key, make_tls, server_names
from federated.flower_processes import FlowerHost, WarmTrainer
from federated.run_config import RAY_NAMESPACE, NodeConfig, RunSpec
from federated.run_files import RunFiles
from federated.strategy import RoundReport

log = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parent / "flower_app"  # the manifest `flwr run` packages
FEDERATION = "fedforge"  # the SuperLink's name in this run's Flower config
START_TIMEOUT_S = 60


class FederationError(UserError):
    """The federation could not start or its run failed. The message says where to look."""


def fleet_bind_host(flower: FlowerSettings) -> str:
    """Where the Fleet API listens: every interface only with TLS and node authentication."""
    return "0.0.0.0" if flower.secure else "127.0.0.1"


class Federation:
    def __init__(self, run: RunSpec, files: RunFiles) -> None:
        self.spec, self.cfg, self.files = run, run.cfg, files
        self.logs = files.root / "logs"
        self.link: ray.actor.ActorHandle | None = None
        self.nodes: list[ray.actor.ActorHandle] = []
        self.node_pids: list[int] = []  # each in-cluster SuperNode's process (group) id
        self.trainers: list[ray.actor.ActorHandle] = []  # warm trainers (flower.warm_clients)
        self.address = ""  # host:port outside SuperNodes connect to
        self.root_certificates: Path | None = None

    def __enter__(self) -> Federation:
        try:
            self._start_superlink()
            self._start_supernodes()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- start --------------------------------------------------------------------------------

    def _start_superlink(self) -> None:
        flower = self.cfg.flower
        # On the job's own node (the head, under `ray job submit` or a KubeRay RayJob): where a
        # VM's open port or the generated Fleet API Service sends outside SuperNodes.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.link = FlowerHost.options(scheduling_strategy=here).remote()
        self.link_ip, self.link_node = ray.get(self.link.node.remote())
        if not flower.secure:  # nobody outside this machine may reach an open Fleet API
            self.link_ip = "127.0.0.1"
        self.address = f"{flower.host or self.link_ip}:{flower.fleet_port}"
        argv = [
            "flower-superlink",
            "--disable-runtime-dependency-installation",  # never `uv sync` an app's deps at run
            "--fleet-api-address",
            f"{fleet_bind_host(flower)}:{flower.fleet_port}",
            "--control-api-address",
            f"127.0.0.1:{flower.control_port}",
            "--serverappio-api-address",
            f"127.0.0.1:{flower.serverappio_port}",
            *self._tls_args(),
        ]
        if flower.supernode_auth:
            argv.append("--enable-supernode-auth")
        log_path = self.logs / "superlink.log"
        ray.get(self.link.start.remote("superlink", argv, {}, str(log_path)))
        for port in (flower.control_port, flower.fleet_port):
            if not ray.get(self.link.wait_for_port.remote(port, START_TIMEOUT_S)):
                raise FederationError(
                    f"the SuperLink did not open port {port} within {START_TIMEOUT_S} s "
                    f"(is the port taken?); see {log_path}"
                )
        self._write_flower_config()
        log.info("SuperLink up; SuperNodes join at %s (log: %s)", self.address, log_path)

    def _tls_args(self) -> list[str]:
        flower = self.cfg.flower
        if not flower.tls:
            return ["--insecure"]
        certs = Path(flower.certs_dir) if flower.certs_dir else self.files.root / "certs"
        # Outside nodes dial `host`, in-cluster nodes the SuperLink node's IP: cover both.
        names = [flower.host or self.link_ip, self.link_ip, "127.0.0.1", "localhost"]
        hosts = list(dict.fromkeys(names))
        if not flower.certs_dir and not set(hosts) <= server_names(certs / "server.pem"):
            make_tls(certs, hosts, keep_ca_key=False)  # new, or made for other names
        for name in ("ca.crt", "server.pem", "server.key"):
            if not (certs / name).is_file():
                raise FederationError(f"flower.certs_dir {certs} has no {name}")
        self.root_certificates = certs / "ca.crt"
        return [
            "--ssl-ca-certfile",
            str(certs / "ca.crt"),
            "--ssl-certfile",
            str(certs / "server.pem"),
            "--ssl-keyfile",
            str(certs / "server.key"),
        ]

    @property
    def flwr_home(self) -> Path:
        return self.files.root / "flwr-home"

    def _write_flower_config(self) -> None:
        connection: dict[str, object] = {"address": f"127.0.0.1:{self.cfg.flower.control_port}"}
        if self.root_certificates:
            connection["root-certificates"] = str(self.root_certificates)
        else:
            connection["insecure"] = True
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        config = {"superlink": {"default": FEDERATION, FEDERATION: connection}}
        (self.flwr_home / "config.toml").write_text(tomli_w.dumps(config))

    def _flwr(self, *args: str, timeout: float = 60) -> str:
        """Run the `flwr` CLI on the SuperLink's node; raise with its output if it fails."""
        code, output = ray.get(
            self.link.run.remote(["flwr", *args], {"FLWR_HOME": str(self.flwr_home)}, timeout)
        )
        if code != 0:
            raise FederationError(f"`flwr {' '.join(args)}` failed ({code}):\n{output}")
        return output

    def authorize(self, public_key: Path) -> None:
        """Register a SuperNode's public key: only registered nodes may join (supernode_auth)."""
        self._flwr("supernode", "register", str(public_key), FEDERATION)
        log.info("authorised SuperNode key %s", public_key)

    def _start_supernodes(self) -> None:
        flower = self.cfg.flower
        for key in flower.authorized_keys:
            self.authorize(Path(key))
        threads = max(1, int(flower.cpus_per_supernode))
        gcs_address = ray.get_runtime_context().gcs_address
        for partition in range(self.cfg.federation.num_clients):
            node_config = NodeConfig(partition=partition)
            resources = {
                "num_cpus": flower.cpus_per_supernode,
                "num_gpus": flower.gpus_per_supernode,
            }
            if flower.warm_clients:  # the trainer holds the node's resources, the host none
                name = f"fedforge-{self.cfg.name}-trainer-{partition}"
                trainer = WarmTrainer.options(name=name, namespace=RAY_NAMESPACE, **resources)
                self.trainers.append(trainer.remote(threads))
                node_config = replace(node_config, warm_trainer=name, ray_address=gcs_address)
                resources = {"num_cpus": 0}
            if not self.cfg.flower.secure:  # the Fleet API is on the SuperLink node's loopback
                resources["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
                    self.link_node, soft=False
                )
            node = FlowerHost.options(**resources).remote()
            argv = [
                "flower-supernode",
                *self._supernode_tls_args(partition),
                "--superlink",
                f"{self.link_ip}:{flower.fleet_port}",
                "--clientappio-api-address",
                f"127.0.0.1:{ray.get(node.free_port.remote())}",
                "--node-config",
                node_config.to_flower(),
            ]
            # Torch would start a thread per core in every ClientApp; give it the CPUs Ray gave.
            env = {"OMP_NUM_THREADS": str(threads)}
            log_path = self.logs / f"supernode-{partition}.log"
            self.node_pids.append(ray.get(node.start.remote("supernode", argv, env, str(log_path))))
            self.nodes.append(node)
        log.info("started %d in-cluster SuperNodes", len(self.nodes))

    def _supernode_tls_args(self, partition: int) -> list[str]:
        if self.root_certificates is None:
            return ["--insecure"]
        args = ["--root-certificates", str(self.root_certificates)]
        if self.cfg.flower.supernode_auth:
            private, public = make_node_key(self.files.root / "node-keys" / f"client-{partition}")
            self.authorize(public)
            args += ["--auth-supernode-private-key", str(private)]
        return args

    # -- run ----------------------------------------------------------------------------------

    def run(self, on_round: Callable[[RoundReport], None], poll_seconds: float = 1.0) -> None:
        """Submit the Flower run and follow it to the end, calling `on_round` per saved round."""
        run_config = self.files.root / "run-config.toml"
        run_config.write_text(tomli_w.dumps(self.spec.to_flower()))
        self.files.clear_error()
        argv = ["flwr", "run", str(APP_DIR), FEDERATION, "--stream", "--run-config"]
        argv.append(str(run_config))
        run_log = self.logs / "flwr-run.log"
        env = {"FLWR_HOME": str(self.flwr_home)}
        ray.get(self.link.start.remote("run", argv, env, str(run_log)))
        reported = {r.round for r in self.files.rounds()}
        dropped: set[int] = set()
        while True:
            finished = ray.get(self.link.returncode.remote("run")) is not None
            for report in self.files.rounds():
                if report.round not in reported:
                    reported.add(report.round)
                    on_round(report)
            if finished:
                break
            if ray.get(self.link.returncode.remote("superlink")) is not None:
                raise FederationError(f"the SuperLink exited; see {self.logs / 'superlink.log'}")
            self._note_dropped_nodes(dropped)
            time.sleep(poll_seconds)
        done = self.files.latest_round() or 0
        if done < self.cfg.federation.rounds:
            why = self.files.read_error()
            raise FederationError(
                (f"{why}\n" if why else "")
                + f"the Flower run ended after round {done} of {self.cfg.federation.rounds}; "
                f"see {run_log}{self._stopped_nodes()} (the saved rounds are kept: submitting "
                "again resumes)"
            )

    def _stopped_nodes(self) -> str:
        stopped = []
        for partition, node in enumerate(self.nodes):
            try:
                code = ray.get(node.returncode.remote("supernode"))
            except ray.exceptions.RayActorError:
                code = "actor lost"
            if code is not None:
                stopped.append(f"{partition} ({self.logs / f'supernode-{partition}.log'})")
        return f"; in-cluster SuperNodes that stopped: {', '.join(stopped)}" if stopped else ""

    def _note_dropped_nodes(self, dropped: set[int]) -> None:
        for partition, node in enumerate(self.nodes):
            if partition in dropped:
                continue
            try:
                code = ray.get(node.returncode.remote("supernode"))
            except ray.exceptions.RayActorError:
                code = "actor lost"
            if code is not None:
                dropped.add(partition)
                log.warning(
                    "in-cluster SuperNode %d stopped (%s); rounds go on without it if "
                    "min_train_nodes allows; see %s",
                    partition,
                    code,
                    self.logs / f"supernode-{partition}.log",
                )

    # -- stop ---------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop SuperNodes first (they would retry a vanished SuperLink), then the SuperLink."""
        for trainer in self.trainers:
            ray.kill(trainer)
        for actor in [*self.nodes, self.link]:
            if actor is None:
                continue
            try:
                ray.get(actor.stop.remote(), timeout=30)
            except (ray.exceptions.RayError, TimeoutError) as exc:
                log.warning("could not stop a Flower process cleanly: %s", exc)
            ray.kill(actor)
        self.nodes, self.link, self.trainers = [], None, []
