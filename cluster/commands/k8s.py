"""`fedforge k8s generate`: KubeRay manifests from a profile's configs
(cluster/commands/k8s_manifests.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cluster.commands.k8s_manifests import API_KEYS_SECRET, API_KEYS_SECRET_KEY, PROFILES, generate

k8s_app = typer.Typer(help="Kubernetes (KubeRay) manifests generated from the job configs.")


@k8s_app.command("generate")
def generate_command(
    profile: Annotated[str, typer.Option(help=f"One of: {', '.join(PROFILES)}.")] = "demo",
    out: Annotated[Path, typer.Option(help="Writes OUT/<profile>/*.yaml.")] = Path("configs/k8s"),
    image: Annotated[
        str | None,
        typer.Option(help="Container image (default: fedforge:<version>-cpu, -gpu for gpu)."),
    ] = None,
    repo: Annotated[
        Path, typer.Option(help="Repository whose configs/ are read (the image's tree).")
    ] = Path("."),
) -> None:
    """Write a RayCluster, a RayJob per job, a RayService and the state volume's claim."""
    for path in generate(profile, repo.resolve(), out, image):
        typer.echo(f"wrote {path}")
    typer.echo(
        f"API keys: kubectl create secret generic {API_KEYS_SECRET} "
        f"--from-literal={API_KEYS_SECRET_KEY}=sha256:<hex>[,...]"
    )
